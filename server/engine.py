"""The engine: models with approximate MLPs, run off the event loop by one worker thread.

One worker executes every job, and a job's k, search effort and candidate factor hold only
inside it (`configured`), so they never leak into another. Requests of one model with the
same knobs share the work (server/batching.py): forward passes are merged into one padded
batch, and completions join a decode batch that advances one step per job, so other work
runs between its steps. Requests wait in a bounded queue: when it is full the caller gets 429.
A request's work ends with it: a hook before every layer of every forward pass asks
`check_job`, which stops the pass once every request sharing it is past its deadline, has
lost its caller, or cannot finish before a drain ends; a decode batch drops such a row
between steps and the others go on.
Shadow comparisons (exact vs approximate on a sampled request) run on the same
worker, only when no request is waiting, and never hold a request up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from ann_mlp.approx_model import ApproxModel
from ann_mlp.capture import Batch, batch_from_ids, forward
from ann_mlp.decode import DecodeBatch, Sequence
from ann_mlp.errors import AnnMlpError, DeadlineError
from ann_mlp.evaluate import Comparison
from ann_mlp.planner import replan_if_moved
from server.batching import Batches
from server.errors import (
    ClientGone,
    DeadlineExceeded,
    InvalidRequest,
    NotReady,
    Overloaded,
    ServiceError,
    ShuttingDown,
    UnknownModel,
)
from server.metrics import Metrics
from server.settings import ServerSettings

log = logging.getLogger(__name__)
Mode = Literal["auto", "approx", "exact", "compare"]
T = TypeVar("T")
MAX_PENDING_SHADOWS = 2
POLL_S = 0.1  # how often a waiting request looks for its caller having left
# A drain answers what cannot finish this long before the server's own drain timeout, so that
# every answer is out before the server stops waiting for connections.
DRAIN_MARGIN_S = 1.0


@dataclass
class JobState:
    """One queued or running job, as its request sees it."""

    deadline: float  # time.monotonic() by which the caller wants its answer
    abandoned: bool = False  # its caller left or gave up: the work stops at its next check


@dataclass(frozen=True)
class Knobs:
    """Per-request options; None means the store's tuned value."""

    mode: Mode = "auto"
    k: int | None = None
    effort: int | None = None
    candidate_factor: float | None = None


@dataclass
class Timing:
    total_ms: float = 0.0
    index_search_ms: float = 0.0
    rest_ms: float = 0.0


@dataclass
class Run:
    """What one forward pass produced, with its costs and (compare mode) its fidelity report."""

    output: Any  # the model output used for the answer (approximate unless mode == exact)
    batch: Batch
    timing: Timing
    scanned_fraction: float | None
    dense_fraction: float | None = None
    report: dict[str, Any] | None = None
    # The settings the pass ran with, per layer: k, neurons retrieved per token, search parameters.
    k: list[int] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    search_params: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int = 1  # inputs in the forward passes this request shared (decoding: the most rows)


@dataclass
class ServedModel:
    name: str
    approx: ApproxModel
    shadow: Comparison | None = None  # running exact-vs-approximate aggregate of shadow samples
    shadow_samples: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kind(self) -> str:
        return self.approx.checkpoint.kind

    @property
    def tokenizer(self):
        return self.approx.checkpoint.tokenizer

    @property
    def context(self) -> int | None:
        """Positions the model can attend over (None: no fixed limit, e.g. relative positions)."""
        return getattr(self.approx.checkpoint.model.config, "max_position_embeddings", None)

    def live_summary(self) -> dict[str, Any] | None:
        with self.lock:
            if self.shadow is None or self.shadow_samples == 0:
                return None
            layers = self.shadow.layer_reports()
            return {
                "samples": self.shadow_samples,
                "recall_at_k": sum(entry.recall_at_k for entry in layers) / len(layers),
                "rel_output_error": sum(entry.rel_output_error for entry in layers) / len(layers),
                "scanned_fraction": sum(entry.scanned_fraction for entry in layers) / len(layers),
                "end_to_end": self.shadow.end_to_end.report(),
            }


class Engine:
    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.draining = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ann-mlp-engine")
        self._pending = 0
        self._pending_shadows = 0
        self._pending_lock = threading.Lock()
        metrics.jobs.set_function(lambda: self._pending)  # read at scrape time
        self._random = random.Random(0)
        self.drain_deadline = float("inf")  # time.monotonic() by which a drain answers everything
        # The requests whose work runs now, for work that stops between layers; one worker runs every job.
        self._running: list[JobState] = []
        self.batches = Batches(self)

    # -- lifecycle ------------------------------------------------------------------
    def load(self) -> None:
        """Verify and load every store, then warm each model up in every mode."""
        torch.set_num_threads(self.settings.torch_threads)
        for path in self.settings.stores:
            approx = ApproxModel.open(path)
            replan_if_moved(approx)  # mode auto follows timings taken on this machine
            name = approx.manifest.name
            if name in self.models:
                raise AnnMlpError(f"two stores are named {name!r}; serve each model once")
            self.models[name] = ServedModel(name, approx)
            self._stop_between_layers(approx)
        for served in self.models.values():
            ids = served.tokenizer("warm up", add_special_tokens=True)["input_ids"]
            for mode in ("auto", "approx", "exact", "compare"):
                self._run(served, batch_from_ids(served.approx.checkpoint, [ids]), Knobs(mode=mode), record=False)
        self.ready = True
        log.info("serving %s", ", ".join(self.models))

    def _stop_between_layers(self, approx: ApproxModel) -> None:
        """Before each layer of any forward pass, stop a job that should end (check_job): a long
        forward (many inputs, compare mode) ends within one layer of its deadline or its caller's
        leaving. The hook sits on each MLP's parent module, which patching never swaps."""
        adapter = approx.checkpoint.adapter

        def stop_if_asked(*_) -> None:
            if reason := self.check_job():
                raise DeadlineError(reason)

        for layer in range(adapter.num_layers()):
            parent, _ = adapter.slot(adapter.mlp_input_path(layer))
            parent.register_forward_pre_hook(stop_if_asked)

    def begin_drain(self) -> None:
        """Refuse new requests; answer those that cannot finish in the drain with 503."""
        if not self.draining:
            margin = min(DRAIN_MARGIN_S, self.settings.drain_timeout_s / 4)
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s - margin
        self.draining = True

    def _answer_by(self, job: JobState) -> float:
        return min(job.deadline, self.drain_deadline)

    def stopped_error(self, message: str) -> ServiceError:
        """The error of a job that ran out of time: 503 with Retry-After when a drain cut it short."""
        if self.draining and self.drain_deadline <= time.monotonic():
            return ShuttingDown(f"the server is shutting down: {message}", self.settings.retry_after_s)
        return DeadlineExceeded(message)

    def stop_reason(self, job: JobState) -> str | None:
        """Why a request's work should stop now, or None."""
        if job.abandoned:
            return "the request was abandoned"
        if time.monotonic() > self._answer_by(job):
            return "the server is shutting down" if self.draining else "deadline passed"
        return None

    def check_job(self) -> str | None:
        """Before each layer of the running work: why it should stop now (every request sharing it
        should), or None."""
        reasons = [self.stop_reason(job) for job in self._running]
        return reasons[0] if reasons and all(reasons) else None

    @contextmanager
    def running(self, jobs: list[JobState]) -> Iterator[None]:
        """The requests whose work the worker runs within the block, for check_job."""
        outer, self._running = self._running, jobs
        try:
            yield
        finally:
            self._running = outer

    def shutdown(self) -> None:
        self.ready = False
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def pending(self) -> int:
        return self._pending

    # -- requests ---------------------------------------------------------------------
    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"model {name!r} is not served; see GET /v1/models", param="model") from None

    def admit(self) -> JobState:
        """Count a new request as pending, or refuse it: not ready, draining, or the queue is full."""
        if self.draining or not self.ready:
            if self.draining:
                raise NotReady("the server is shutting down", self.settings.retry_after_s)
            raise NotReady("the server is not ready yet")
        with self._pending_lock:
            if self._pending >= self.settings.queue_size:
                raise Overloaded(f"{self._pending} requests are waiting; retry later", self.settings.retry_after_s)
            self._pending += 1
            self.metrics.jobs_submitted.inc()
        return JobState(deadline=time.monotonic() + self.settings.request_timeout_s)

    def done_callback(self, future: Future) -> None:
        """A pending request's work ended (answered, failed or stopped): it leaves the queue's count."""
        future.add_done_callback(self._job_done)

    def _job_done(self, _future: Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def schedule(self, work: Callable[[], None]) -> None:
        """Run `work` on the worker after the jobs queued before it."""
        self._executor.submit(work)

    async def submit(self, job: Callable[[], T], disconnected: Callable[[], Awaitable[bool]] | None = None) -> T:
        """Queue a job for the worker, alone; wait for it until the request's deadline (or the
        drain's end), giving it up, and stopping its work, if the caller disconnects meanwhile."""
        state = self.admit()

        def run_if_wanted() -> T:
            if state.abandoned or time.monotonic() > self._answer_by(state):
                raise self.stopped_error("the request's time passed while it was queued")
            with self.running([state]):
                return job()

        future = self._executor.submit(run_if_wanted)
        self.done_callback(future)
        return await self.wait(future, state, disconnected)

    async def wait(self, future: Future, state: JobState, disconnected: Callable[[], Awaitable[bool]] | None) -> T:
        """A request's answer, or its end: at its deadline (or the drain's), or when its caller
        disconnects, the request is marked abandoned, so its work stops at the next check."""
        answer = asyncio.wrap_future(future)
        while True:
            left = self._answer_by(state) - time.monotonic()
            done, _ = await asyncio.wait({answer}, timeout=max(0.0, min(POLL_S, left)))
            if done:
                return answer.result()
            if disconnected is not None and await disconnected():
                state.abandoned = True
                self.metrics.abandoned.labels("disconnected").inc()
                raise ClientGone("the client disconnected")
            if time.monotonic() >= self._answer_by(state):
                state.abandoned = True
                self.metrics.abandoned.labels("draining" if self.draining else "deadline").inc()
                raise self.stopped_error(f"no answer within {self.settings.request_timeout_s:g} s")

    # -- work, on the worker thread -------------------------------------------------------
    def run(self, served: ServedModel, batch: Batch, knobs: Knobs) -> Run:
        """One forward pass in the request's mode, then perhaps a shadow comparison of it."""
        run = self._run(served, batch, knobs, record=True)
        if knobs.mode in ("approx", "auto"):
            self.maybe_shadow(served, batch, knobs)
        return run

    @contextmanager
    def configured(self, served: ServedModel, knobs: Knobs) -> Iterator[None]:
        """The request's k, effort and candidate factor on the served model, for the block only."""
        manifest = served.approx.manifest
        search = {} if knobs.effort is None else {manifest.layers[0].effort_param: knobs.effort}
        with ExitStack() as stack:
            try:
                stack.enter_context(served.approx.configured(knobs.k, search, knobs.candidate_factor))
            except AnnMlpError as err:  # settings the store cannot take; the work's own errors pass through
                raise InvalidRequest(str(err), param="ann_mlp") from err
            yield

    def _run(self, served: ServedModel, batch: Batch, knobs: Knobs, record: bool) -> Run:
        with self.configured(served, knobs):
            return self._run_configured(served, batch, knobs, record)

    def _run_configured(self, served: ServedModel, batch: Batch, knobs: Knobs, record: bool) -> Run:
        approx = served.approx
        approx.reset_stats()
        start = time.perf_counter()
        report = None
        try:
            if knobs.mode == "exact":
                output = forward(approx.checkpoint, batch)
            elif knobs.mode in ("approx", "auto"):
                with approx.approximate(planned=knobs.mode == "auto"):  # packed where the family can (ann_mlp.packing)
                    output = forward(approx.checkpoint, batch, packed=True)
            else:
                comparison = Comparison(approx)
                _, output = comparison.add(batch)
                report = {
                    "layers": [vars(entry) for entry in comparison.layer_reports()],
                    "end_to_end": comparison.end_to_end.report(),
                }
        except DeadlineError as err:
            raise self.stopped_error(str(err)) from err
        return self.measured(served, output, batch, time.perf_counter() - start, report, record)

    def measured_join(self, served: ServedModel, decoding: DecodeBatch, sequences: list[Sequence]) -> Run:
        """The sequences' prompt pass, joining them to `decoding`, as a Run: its timing and costs."""
        served.approx.reset_stats()
        start = time.perf_counter()
        decoding.join(sequences)
        prompts = batch_from_ids(served.approx.checkpoint, [s.prompt for s in sequences])
        return self.measured(served, None, prompts, time.perf_counter() - start)

    def measured(
        self,
        served: ServedModel,
        output: Any,
        batch: Batch,
        seconds: float,
        report: dict[str, Any] | None = None,
        record: bool = True,
    ) -> Run:
        """A pass's Run from its output and the MLPs' counters since their last reset."""
        mlps = served.approx.mlps.values()
        search = sum(m.stats.search_seconds for m in mlps)
        # A dense layer scores every key: counted, so planned runs compare honestly with approx ones.
        tokens = sum(m.stats.queries + m.stats.dense_tokens for m in mlps)
        scored = sum(m.stats.keys_scored + m.stats.dense_tokens * m.index.num_keys for m in mlps)
        keys = sum((m.stats.queries + m.stats.dense_tokens) * m.index.num_keys for m in mlps)
        scanned = scored / keys if keys else None
        dense = sum(m.stats.dense_tokens for m in mlps) / tokens if tokens else None
        if record and scanned is not None:
            self.metrics.scanned_fraction.labels(served.name).observe(scanned)
        timing = Timing(seconds * 1e3, search * 1e3, (seconds - search) * 1e3)
        return Run(
            output,
            batch,
            timing,
            scanned,
            dense,
            report,
            k=[m.k for m in mlps],
            candidates=[m.candidates for m in mlps],
            search_params=[dict(m.search_params) for m in mlps],
            batch_size=len(batch.mask),
        )

    def maybe_shadow(self, served: ServedModel, batch: Batch, knobs: Knobs) -> None:
        if self.settings.shadow_rate <= 0 or self._random.random() >= self.settings.shadow_rate:
            return
        with self._pending_lock:
            if self._pending_shadows >= MAX_PENDING_SHADOWS:
                self.metrics.shadow_dropped.labels(served.name).inc()
                return
            self._pending_shadows += 1
        self._executor.submit(self._shadow, served, batch, knobs)

    def _shadow(self, served: ServedModel, batch: Batch, knobs: Knobs) -> None:
        try:
            if self.draining or self._pending > 0:  # requests first: a shadow is never worth a delay
                self.metrics.shadow_dropped.labels(served.name).inc()
                return
            with self.configured(served, knobs), served.lock:
                if served.shadow is None:
                    served.shadow = Comparison(served.approx)
                served.shadow.add(batch)
                served.shadow_samples += 1
            live = served.live_summary()
            self.metrics.shadow_samples.labels(served.name).inc()
            self.metrics.live_recall.labels(served.name).set(live["recall_at_k"])
            self.metrics.live_output_error.labels(served.name).set(live["rel_output_error"])
        except Exception:  # a failed shadow must never take the worker down
            log.exception("shadow comparison failed")
        finally:
            with self._pending_lock:
                self._pending_shadows -= 1
