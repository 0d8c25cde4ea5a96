"""Requests that share work: forward passes merged into one batch, completions decoded together.

Requests of one model with the same knobs are compatible. A forward-pass request (embeddings,
infer) joins the open pass of its kind, which runs when the worker reaches it: under load the
requests that arrived meanwhile run as one padded batch; on a quiet server a request runs at
once, alone (`batch_wait_ms` can hold a pass open a little longer for company). A completion
joins its kind's decode batch between two steps; the batch advances one step per job, and
re-queues itself behind whatever else waits, so passes and other batches run in between.

In mode auto the store's plan chooses per layer and per call (so per batch size) between the
dense and the approximate MLP: a batch large enough for dense to win runs dense. Modes exact and
compare are never merged: an exact answer is bit-identical to the request made alone, and a
compare report describes its own request. A merged answer equals the request made alone up to
float32 summation order (a batch's shapes change the kernels' order of summation) and, in mode
auto, the plan's choice for the batch's size; greedy tokens then agree unless two candidates'
logits are that close.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ann_mlp.capture import Batch, batch_from_ids
from ann_mlp.decode import DecodeBatch, Sequence, pad_token_id
from ann_mlp.errors import DeadlineError
from ann_mlp.packing import packed_rows

if TYPE_CHECKING:
    from server.engine import Engine, JobState, Knobs, Run, ServedModel

log = logging.getLogger(__name__)
MERGED_MODES = ("auto", "approx")
MAX_PADDING = 0.25  # padded positions a merged pass may add, as a share of its real tokens


@dataclass(eq=False)
class PassRequest:
    """One request's part of a merged forward pass."""

    state: JobState
    future: Future
    prepare: Callable[[], list[list[int]]]  # tokenize and check its inputs (on the worker)
    finish: Callable[[Run], Any]  # its answer from its rows of the pass
    ids: list[list[int]] = field(default_factory=list)


@dataclass(eq=False)
class PassGroup:
    """Forward-pass requests of one model and one set of knobs, run when the worker reaches them."""

    served: ServedModel
    knobs: Knobs
    requests: list[PassRequest] = field(default_factory=list)
    inputs: int = 0


@dataclass(eq=False)
class Generation:
    """One completion request: its prompts decode as rows of a shared decode batch."""

    state: JobState
    future: Future
    prepare: Callable[[], list[Sequence]]  # tokenize, check and make its sequences (on the worker)
    finish: Callable[[list[Sequence], Run], Any]  # its answer once every sequence is done
    inputs: int  # its prompts: the rows it will take
    sequences: list[Sequence] = field(default_factory=list)
    run: Run | None = None  # its prompt pass: timing, costs
    most_rows: int = 0


@dataclass(eq=False)
class DecodeGroup:
    """Completions of one model and one set of knobs, decoding together."""

    served: ServedModel
    knobs: Knobs
    batch: DecodeBatch
    waiting: list[Generation] = field(default_factory=list)  # not joined yet
    running: list[Generation] = field(default_factory=list)
    scheduled: bool = False  # a step is queued on the worker


class Batches:
    """The engine's open passes and decode groups; requests join them from the event loop,
    the worker runs them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._open_passes: dict[tuple[str, Knobs], PassGroup] = {}
        self._decoding: dict[tuple[str, Knobs], DecodeGroup] = {}

    # -- forward passes -------------------------------------------------------------------
    async def forward(
        self,
        served: ServedModel,
        knobs: Knobs,
        inputs: int,
        prepare: Callable[[], list[list[int]]],
        finish: Callable[[Run], Any],
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> Any:
        """A forward-pass request's answer: `prepare` gives its token ids, `finish` its answer from
        its rows of the (possibly merged) pass. `inputs` counts its inputs against the batch limit."""
        engine = self.engine
        state = engine.admit()
        request = PassRequest(state, Future(), prepare, finish)
        engine.done_callback(request.future)
        settings = engine.settings
        key = (served.name, knobs)
        with self._lock:
            group = self._open_passes.get(key) if knobs.mode in MERGED_MODES else None
            new = group is None or group.inputs + inputs > settings.max_batch_inputs
            if new:
                group = PassGroup(served, knobs)
                if knobs.mode in MERGED_MODES:
                    self._open_passes[key] = group
            group.requests.append(request)
            group.inputs += inputs
        if new:
            self._start_later(lambda: self._run_passes(key, group), settings.batch_wait_ms)
        return await engine.wait(request.future, state, disconnected)

    def _start_later(self, work: Callable[[], None], wait_ms: float) -> None:
        if wait_ms <= 0:
            self.engine.schedule(work)
        else:
            timer = threading.Timer(wait_ms / 1e3, self.engine.schedule, (work,))
            timer.daemon = True
            timer.start()

    def _run_passes(self, key: tuple[str, Knobs], group: PassGroup) -> None:
        """On the worker: close the group, then run its live requests in passes of similar lengths."""
        engine = self.engine
        with self._lock:
            if self._open_passes.get(key) is group:
                del self._open_passes[key]
        live = []
        for request in group.requests:
            if engine.stop_reason(request.state):
                _fail(request.future, engine.stopped_error("the request's time passed while it was queued"))
                continue
            try:
                request.ids = request.prepare()
            except Exception as err:  # e.g. a text over the limits: this request's answer alone
                _fail(request.future, err)
                continue
            live.append(request)
        packs = group.served.approx.checkpoint.adapter.packs_inputs
        for chunk in _chunks(live, engine.settings.max_batch_tokens, packs):
            self._run_pass(group, chunk)

    def _run_pass(self, group: PassGroup, requests: list[PassRequest]) -> None:
        engine = self.engine
        ids = [x for request in requests for x in request.ids]
        engine.metrics.batch_rows.labels(group.served.name, "pass").observe(len(ids))
        try:
            with engine.running([r.state for r in requests]):
                run = engine.run(group.served, batch_from_ids(group.served.approx.checkpoint, ids), group.knobs)
        except Exception as err:
            for request in requests:
                _fail(request.future, err)
            return
        start = 0
        for request in requests:
            rows = _rows(run, start, start + len(request.ids))
            start += len(request.ids)
            try:
                answer = request.finish(rows)
            except Exception as err:
                _fail(request.future, err)
            else:
                _answer(request.future, answer)

    # -- decoding ---------------------------------------------------------------------------
    async def generate(
        self,
        served: ServedModel,
        knobs: Knobs,
        inputs: int,
        prepare: Callable[[], list[Sequence]],
        finish: Callable[[list[Sequence], Run], Any],
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> Any:
        """A completion request's answer, decoded in its kind's decode batch (mode auto or approx):
        `prepare` gives its sequences (`inputs` of them), `finish` its answer once all are done."""
        engine = self.engine
        state = engine.admit()
        generation = Generation(state, Future(), prepare, finish, inputs)
        engine.done_callback(generation.future)
        key = (served.name, knobs)
        with self._lock:
            group = self._decoding.get(key)
            if group is None:
                model = served.approx.checkpoint.model
                group = DecodeGroup(served, knobs, DecodeBatch(model, pad_token_id(served.tokenizer)))
                self._decoding[key] = group
            group.waiting.append(generation)
            start = not group.scheduled
            group.scheduled = True
        if start:
            engine.schedule(lambda: self._advance(key, group))
        return await engine.wait(generation.future, state, disconnected)

    def _advance(self, key: tuple[str, Knobs], group: DecodeGroup) -> None:
        """On the worker: drop rows whose request ended, let waiting requests join, run one step,
        answer the requests whose sequences are all done; then queue the next step, if any."""
        engine = self.engine
        try:
            with engine.configured(group.served, group.knobs):
                with group.served.approx.approximate(planned=group.knobs.mode == "auto"):
                    self._leave_ended(group)
                    self._join_waiting(group)
                    if group.batch.rows:
                        rows = len(group.batch.rows)
                        engine.metrics.batch_rows.labels(group.served.name, "decode").observe(rows)
                        with engine.running([g.state for g in group.running]):
                            group.batch.step()
                        for generation in group.running:
                            generation.most_rows = max(generation.most_rows, rows)
                        self._answer_done(group)
        except DeadlineError as err:  # every running request ended during the step
            self._fail_running(group, engine.stopped_error(str(err)))
        except Exception as err:  # e.g. knobs the store cannot take: every request of the group shares them
            self._fail_running(group, err)
            with self._lock:
                waiting, group.waiting = group.waiting, []
            for generation in waiting:
                _fail(generation.future, err)
        with self._lock:
            more = bool(group.batch.rows or group.waiting)
            group.scheduled = more
            if not more:
                del self._decoding[key]
        if more:
            try:
                engine.schedule(lambda: self._advance(key, group))
            except RuntimeError as err:  # the worker has shut down
                self._fail_running(group, err)

    def _leave_ended(self, group: DecodeGroup) -> None:
        engine = self.engine
        for generation in list(group.running):
            if reason := engine.stop_reason(generation.state):
                group.batch.leave(generation.sequences)
                group.running.remove(generation)
                _fail(generation.future, engine.stopped_error(reason))

    def _join_waiting(self, group: DecodeGroup) -> None:
        engine = self.engine
        limit = engine.settings.max_batch_inputs
        with self._lock:
            if group.batch.rows and not group.batch.mergeable:
                return  # rows cannot join this model's cache mid-decoding: they wait for it to empty
            # Join in arrival order while the rows fit the limit (a request above it joins an empty batch).
            rows, joining = len(group.batch.rows), []
            while group.waiting and (not rows or rows + group.waiting[0].inputs <= limit):
                rows += group.waiting[0].inputs
                joining.append(group.waiting.pop(0))
        for generation in joining:
            if reason := engine.stop_reason(generation.state):
                _fail(generation.future, engine.stopped_error(reason))
                continue
            try:
                generation.sequences = generation.prepare()
                with engine.running([generation.state]):
                    generation.run = engine.measured_join(group.served, group.batch, generation.sequences)
            except Exception as err:  # its own failure (deadline, input): the other rows go on
                group.batch.leave(generation.sequences)
                _fail(generation.future, engine.stopped_error(str(err)) if isinstance(err, DeadlineError) else err)
                continue
            generation.most_rows = len(generation.sequences)
            group.running.append(generation)
            engine.maybe_shadow(group.served, generation.run.batch, group.knobs)
        self._answer_done(group)

    def _answer_done(self, group: DecodeGroup) -> None:
        for generation in list(group.running):
            if all(s.done for s in generation.sequences):
                group.running.remove(generation)
                run = dataclasses.replace(generation.run, batch_size=generation.most_rows)
                try:
                    answer = generation.finish(generation.sequences, run)
                except Exception as err:
                    _fail(generation.future, err)
                else:
                    _answer(generation.future, answer)

    def _fail_running(self, group: DecodeGroup, err: Exception) -> None:
        for generation in group.running:
            _fail(generation.future, err)
        group.running = []
        group.batch.leave(list(group.batch.rows))


def _chunks(requests: list[PassRequest], max_tokens: int, packed: bool) -> list[list[PassRequest]]:
    """Requests in passes by length: a pass's computed positions stay within max_tokens and within
    MAX_PADDING of its real tokens, since every padded position costs a real one in every layer.
    Computed positions are rows x longest for a padded batch, and the packed rows' for a model
    that packs its inputs (ann_mlp.packing), where unlike lengths mostly fill each other's rows.
    Shortest first, a pass takes every request left when they fit together (packed, longer inputs
    fill the rows that shorter ones leave, so a pass that grows can fit again after it did not);
    otherwise it grows while it fits. A request's inputs stay in one pass; a request over the
    limits runs alone."""

    def fits(chunk: list[PassRequest]) -> bool:
        lengths = [len(x) for request in chunk for x in request.ids]
        rows = len(packed_rows(lengths)) if packed else len(lengths)
        computed = rows * max(lengths)
        return computed <= max_tokens and computed <= (1 + MAX_PADDING) * sum(lengths)

    ordered = sorted(requests, key=lambda r: max(len(x) for x in r.ids))
    chunks: list[list[PassRequest]] = []
    start = 0
    while start < len(ordered):
        end = len(ordered)
        if not fits(ordered[start:end]):
            end = start + 1
            while end < len(ordered) and fits(ordered[start : end + 1]):
                end += 1
        chunks.append(ordered[start:end])
        start = end
    return chunks


def _rows(run: Run, start: int, stop: int) -> Run:
    """A request's rows [start, stop) of a merged pass: its outputs and inputs, timing shared."""
    batch = run.batch
    sliced = Batch(
        inputs={name: value[start:stop] for name, value in batch.inputs.items()},
        mask=batch.mask[start:stop],
        input_ids=batch.input_ids[start:stop],
    )
    rows = len(batch.mask)
    output = type(run.output)(
        **{
            name: value[start:stop]
            for name, value in run.output.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
        }
    )
    return dataclasses.replace(run, output=output, batch=sliced)


def _answer(future: Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
