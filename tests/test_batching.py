"""Requests that share work, on an in-process engine: merged forward passes and decode batches.

The worker is held on a job while requests queue (a state, not a sleep), so which requests
meet in one batch is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from ann_mlp.decode import Sequence
from server.engine import Engine, Knobs
from server.errors import DeadlineExceeded, InvalidRequest
from server.metrics import Metrics
from server.settings import ServerSettings


@pytest.fixture(scope="module")
def engine(tiny_stores):
    engine = Engine(
        ServerSettings(stores=[tiny_stores["tiny-llama"], tiny_stores["tiny-bert"]], max_batch_tokens=4096), Metrics()
    )
    engine.load()
    yield engine
    engine.shutdown()


class Held:
    """The engine's worker held on a job until `release()`: what is queued meanwhile waits."""

    def __init__(self, engine: Engine) -> None:
        self.started, self.released = threading.Event(), threading.Event()
        engine.schedule(self._hold)
        assert self.started.wait(60)

    def _hold(self) -> None:
        self.started.set()
        self.released.wait(60)

    def release(self) -> None:
        self.released.set()


async def queued(engine: Engine, count: int) -> None:
    """Wait until `count` requests are pending on the engine."""
    while engine.pending < count:
        await asyncio.sleep(0)


def forward(engine: Engine, model: str, ids: list[list[int]], knobs: Knobs):
    served = engine.model(model)
    return engine.batches.forward(served, knobs, len(ids), lambda: ids, lambda run: run)


def queued_together(engine: Engine, model: str, requests: list[list[list[int]]]) -> list:
    """Each request's inputs (mode approx), all queued behind the held worker: the runs of the
    passes they meet in."""

    async def main():
        held = Held(engine)
        tasks = [asyncio.ensure_future(forward(engine, model, ids, Knobs(mode="approx"))) for ids in requests]
        await queued(engine, len(tasks))
        held.release()
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


def generation(engine: Engine, prompt: list[int], max_tokens: int, knobs: Knobs):
    served = engine.model("tiny-llama")

    def prepare():
        return [Sequence(prompt, max_tokens, keep_logprobs=True)]

    def finish(sequences, run):
        (sequence,) = sequences
        return sequence.continuation.tokens, torch.stack(sequence.continuation.logprobs), run.batch_size

    return engine.batches.generate(served, knobs, 1, prepare, finish)


# Inputs of short lengths and one twice as long: padded, their pass would compute 30 positions for
# 17 tokens; packed, the short ones fill two rows of 6 beside it (18 positions).
BERT_INPUTS = [[[5, 6, 7]], [[8, 9, 10]], [[15, 16], [17, 18, 19]], [list(range(30, 36))]]


def test_compatible_passes_merge_and_each_gets_its_rows(engine):
    """BERT packs its inputs end to end (ann_mlp.packing), so unlike lengths share one pass."""
    approx, other_k, exact = Knobs(mode="approx"), Knobs(mode="approx", k=8), Knobs(mode="exact")

    async def main():
        alone = [await forward(engine, "tiny-bert", ids, approx) for ids in BERT_INPUTS]
        held = Held(engine)
        tasks = [asyncio.ensure_future(forward(engine, "tiny-bert", ids, approx)) for ids in BERT_INPUTS]
        tasks.append(asyncio.ensure_future(forward(engine, "tiny-bert", BERT_INPUTS[0], other_k)))
        tasks += [asyncio.ensure_future(forward(engine, "tiny-bert", ids, exact)) for ids in BERT_INPUTS[:2]]
        await queued(engine, len(tasks))
        held.release()
        return alone, await asyncio.gather(*tasks)

    def passes_of_5_to_8_inputs() -> float:
        sample = engine.metrics.registry.get_sample_value
        labels = {"model": "tiny-bert", "kind": "pass"}
        return sample("ann_mlp_batch_rows_bucket", {**labels, "le": "8.0"}) - sample(
            "ann_mlp_batch_rows_bucket", {**labels, "le": "4.0"}
        )

    alone, together = asyncio.run(main())
    merged_rows = sum(len(ids) for ids in BERT_INPUTS)
    assert merged_rows == 5 and passes_of_5_to_8_inputs() == 1  # the metric saw the merged pass
    for ids, single, run in zip(BERT_INPUTS, alone, together):
        assert single.batch_size == len(ids) and run.batch_size == merged_rows
        assert run.batch.mask.sum(1).tolist() == [len(x) for x in ids]
        width = single.output.last_hidden_state.shape[1]
        torch.testing.assert_close(
            run.output.last_hidden_state[:, :width][run.batch.mask[:, :width]],
            single.output.last_hidden_state[single.batch.mask],
            atol=1e-4,
            rtol=1e-4,
        )
    other, exact_runs = together[len(BERT_INPUTS)], together[len(BERT_INPUTS) + 1 :]
    assert other.batch_size == 1 and other.k == [8] * len(other.k)  # other knobs: own pass
    assert [run.batch_size for run in exact_runs] == [1, 1]  # exact is never merged


def test_a_packing_family_cuts_passes_where_its_rows_cannot_be_filled(engine):
    """Inputs longer than half the longest cannot share its rows: packed, they would compute 40
    positions for 28 tokens, so the longest runs alone and the rest share a pass."""
    inputs = [[list(range(5, 11))], [list(range(11, 17))], [list(range(17, 23))], [list(range(30, 40))]]
    assert [run.batch_size for run in queued_together(engine, "tiny-bert", inputs)] == [3, 3, 3, 1]


def test_a_packing_family_takes_every_request_when_longer_inputs_fill_what_shorter_ones_leave(engine):
    """Shortest first, the two 3s and the 5 alone would leave a third of their rows empty (15
    positions for 11 tokens), but with the 8s beside them the 5 and a 3 fill a row of 8: every
    request fits one pass of 32 positions for 27 tokens."""
    inputs = [[[5, 6, 7]], [[8, 9, 10]], [list(range(11, 16))], [list(range(20, 28))], [list(range(30, 38))]]
    assert [run.batch_size for run in queued_together(engine, "tiny-bert", inputs)] == [5] * 5


def test_a_padded_family_cuts_passes_where_padding_would_cost_more_than_company_saves(engine):
    """LLaMA runs right-padded batches: close lengths share a pass, a far longer input runs alone."""
    inputs = [[[5, 6, 7]], [[8, 9, 10]], [[15, 16], [17, 18, 19]], [list(range(30, 40))]]
    runs = queued_together(engine, "tiny-llama", inputs)
    assert [run.batch_size for run in runs] == [4, 4, 4, 1]
    assert runs[0].batch.mask.shape[1] == 3 and runs[3].batch.mask.shape[1] == 10  # widths of their passes


def test_decode_rows_join_and_leave_between_steps_and_one_requests_end_spares_the_others(engine):
    knobs = Knobs(mode="approx")
    prompts = {"a": [5, 6], "b": [7, 8, 9, 10, 11, 12], "c": [13], "late": [14, 15, 16, 17]}
    lengths = {"a": 6, "b": 12, "c": 40, "late": 5}

    async def main():
        alone = {name: await generation(engine, prompts[name], lengths[name], knobs) for name in ("a", "b", "late")}
        held = Held(engine)
        tasks = {name: asyncio.ensure_future(generation(engine, prompts[name], lengths[name], knobs)) for name in "abc"}
        expired = asyncio.ensure_future(generation(engine, [3, 4], 40, knobs))
        await queued(engine, 4)
        held.release()
        # Hold the worker again between two steps: a request joins mid-generation, one request's
        # caller leaves and another's deadline passes, while the batch is parked.
        while not tasks["a"].done():
            held = Held(engine)
            (group,) = engine.batches._decoding.values()
            if group.running and all(len(s.continuation.tokens) >= 2 for g in group.running for s in g.sequences):
                break
            held.release()
            await asyncio.sleep(0)
        running = {g.sequences[0].prompt[0]: g for g in group.running}
        running[13].state.abandoned = True  # "c"
        running[3].state.deadline = 0.0
        tasks["late"] = asyncio.ensure_future(generation(engine, prompts["late"], lengths["late"], knobs))
        while not group.waiting:
            await asyncio.sleep(0)
        held.release()
        results = {}
        for name, task in tasks.items():
            try:
                results[name] = await task
            except DeadlineExceeded as err:
                results[name] = err
        with pytest.raises(DeadlineExceeded):
            await expired
        return alone, results, running

    alone, results, running = asyncio.run(main())
    assert isinstance(results["c"], DeadlineExceeded) and "abandoned" in str(results["c"])
    assert len(running[13].sequences[0].continuation.tokens) < lengths["c"]  # its work stopped
    for name in ("a", "b", "late"):
        tokens, logprobs, rows = results[name]
        alone_tokens, alone_logprobs, alone_rows = alone[name]
        assert alone_rows == 1 and rows > 1
        assert tokens == alone_tokens
        torch.testing.assert_close(logprobs, alone_logprobs, atol=1e-4, rtol=1e-4)
    assert engine.batches._decoding == {} and engine.pending == 0


def test_knobs_a_store_cannot_take_fail_their_group_only(engine):
    async def main():
        held = Held(engine)
        bad = asyncio.ensure_future(generation(engine, [5, 6], 4, Knobs(mode="approx", k=10**6)))
        good = asyncio.ensure_future(generation(engine, [5, 6], 4, Knobs(mode="approx")))
        await queued(engine, 2)
        held.release()
        with pytest.raises(InvalidRequest):
            await bad
        return await good

    tokens, _, _ = asyncio.run(main())
    assert len(tokens) == 4
