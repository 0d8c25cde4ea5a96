"""The layer benchmark runs and reports consistent fields (speed is asserted by benchmarks, not here)."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from itertools import islice

import pytest
import torch

from ann_mlp.benchmark import MemoryBenchResult, bench_layer, dense_paths, random_layer
from ann_mlp.text import license_passages
from ann_mlp.timing import time_in_turns
from tests.test_cli import TEXT, run


@pytest.mark.parametrize("gated", [False, True])
def test_dense_paths_agree(gated):
    weights = random_layer(32, 128, gated)
    x = torch.randn(3, 32)
    paths = dense_paths(weights)
    torch.testing.assert_close(torch.from_numpy(paths["numpy"](x)), paths["torch"](x), rtol=1e-4, atol=1e-5)


def test_bench_layer_fields_are_consistent():
    threads = torch.get_num_threads()
    (result,) = bench_layer(64, 512, batches=[2], k=32, repeats=30, threads=threads)
    assert result.dense_path in ("torch", "numpy")
    # fields are rounded (0.1 us, 4 decimals): compare at that precision
    assert result.speedup == pytest.approx(result.dense_us / result.approx_us, rel=0.05, abs=2e-4)
    assert 0 < result.bytes_read_fraction < 1
    assert result.traffic_limit_speedup == pytest.approx(1 / result.bytes_read_fraction, rel=0.01)
    assert result.dense_us > 0 and result.approx_us > 0 and result.repeats == 30 and result.dense_gb_s > 0
    # the parts are timed alone, each a positive time (how they compare depends on the machine's load)
    assert result.search_us > 0 and result.value_sum_us > 0 and result.overhead_us > 0
    assert result.up_rows_us == 0  # not gated
    (gated,) = bench_layer(64, 512, batches=[1], gated=True, k=32, repeats=30, threads=threads)
    assert gated.up_rows_us > 0


def test_timed_calls_take_turns_within_each_repeat():
    order = []
    times = time_in_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    # one warm-up round, then three timed rounds, the order reversed every other round
    assert order == ["a", "b"] + ["a", "b"] + ["b", "a"] + ["a", "b"]
    assert [len(t) for t in times.values()] == [3, 3] and all(t > 0 for t in times["a"] + times["b"])


def test_cli_bench_layer_appends_json(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run(
        "bench",
        "layer",
        "--d-model",
        "64",
        "--d-ff",
        "256",
        "--gated",
        "--batch",
        "1",
        "--batch",
        "4",
        "--k",
        "16",
        "--json",
        str(out),
    )
    assert "random weights: timing only" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in records] == [1, 4]
    for r in records:
        assert {
            "d_model",
            "d_ff",
            "batch",
            "backend",
            "dense_us",
            "approx_us",
            "speedup",
            "bytes_read_fraction",
        } <= r.keys()
        assert r["d_model"] == 64 and r["d_ff"] == 256 and r["gated"] is True
        assert r["bandwidth_gb_s"] > 0 and r["traffic_limit_speedup"] > 1


def test_cli_bench_e2e_reports_throughput_with_fidelity(tiny_stores, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "e2e.jsonl"
    proc = run(
        "bench",
        "e2e",
        str(tiny_stores["tiny-llama"]),
        "--text",
        str(text),
        "--batch",
        "1",
        "--batch",
        "3",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    assert "exact tok/s" in proc.stdout and "auto/exact" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in records] == [1, 3]
    for r in records:
        assert r["model"] == "tiny-llama" and r["tokens"] > 0 and r["repeats"] == 1
        for path in ("approx", "auto"):  # with one pass, the paired speedup is the throughputs' ratio
            ratio = r[f"{path}_tokens_per_s"] / r["exact_tokens_per_s"]
            assert r[f"{path}_speedup"] == pytest.approx(ratio, rel=0.01, abs=2e-4)
        assert 0 <= r["auto_dense_fraction"] <= 1 and 0 <= r["recall_at_k"] <= 1
        assert 0 < r["scanned_fraction"] <= 1 and 0 < r["bytes_read_fraction"]
        assert {"next_token_agreement", "kl_mean", "perplexity_exact", "perplexity_approx"} <= r["end_to_end"].keys()
    assert records[0]["tokens"] == records[1]["tokens"]  # the same text, batched differently


def test_side_by_side_table_reads_eval_reports(tiny_stores, tmp_path):
    from bench import side_by_side

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    for name in ("tiny-bert", "tiny-llama"):
        run("eval", str(tiny_stores[name]), "--text", str(text), "--json", str(tmp_path / f"eval_{name}.json"))
    rows = side_by_side.table(tmp_path, ["tiny-bert", "tiny-llama", "never-built"]).splitlines()
    assert len(rows) == 4  # header, rule, one row per report found
    bert = json.loads((tmp_path / "eval_tiny-bert.json").read_text())
    recall = sum(layer["recall_at_k"] for layer in bert["layers"]) / len(bert["layers"])
    assert rows[2].startswith(f"| tiny-bert | 16 | {recall:.3f} |") and "nearest-neighbour agreement" in rows[2]
    assert rows[3].startswith("| tiny-llama |") and "next-token agreement" in rows[3]


def test_fidelity_page_reads_eval_reports_and_manifests(tiny_stores, tmp_path, monkeypatch):
    from bench import fidelity_tables

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    results = tmp_path / "results"
    results.mkdir()
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(islice(license_passages("evaluation"), 8)))
    for name in ("tiny-bert", "tiny-llama"):
        json_path = str(results / f"{name}.json")
        run("eval", str(tiny_stores[name]), "--text", str(text), "--shift-text", str(held_out), "--json", json_path)
    monkeypatch.setattr(
        fidelity_tables, "STORES", {"tiny-bert": ("bert", [], []), "tiny-llama": ("llama", ["--k", "8"], [])}
    )
    lines = fidelity_tables.page(
        results, ["tiny-bert", "tiny-llama"], "cmd", indexes=tiny_stores["tiny-bert"].parent
    ).splitlines()
    assert lines[0].startswith("# Fidelity") and lines[2] == "Command: `cmd`  "
    bert = json.loads((results / "tiny-bert.json").read_text())
    recall = sum(layer["recall_at_k"] for layer in bert["layers"]) / len(bert["layers"])
    shifted = bert["extra"]["text_shift"]
    held_recall = sum(layer["recall_at_k"] for layer in shifted["layers"]) / len(shifted["layers"])
    summary = [line for line in lines if line.startswith("| tiny-")]
    assert summary[0].startswith(
        f"| tiny-bert | `bert` | in-domain: {bert['text']['source']} | {bert['text']['tokens']} | {recall:.3f} |"
    )
    assert summary[1].startswith(
        f"| tiny-bert | `bert` | held out: {shifted['text']['source']} | {shifted['text']['tokens']} | "
        f"{held_recall:.3f} |"
    )
    assert "nearest-neighbour agreement" in summary[0] and "next-token agreement" in summary[2]
    assert summary[2].startswith("| tiny-llama | `llama --k 8` | in-domain:") and len(summary) == 4
    per_layer = lines[lines.index("## tiny-llama") :]
    llama = json.loads((results / "tiny-llama.json").read_text())
    assert sum(line.startswith("| 0 |") or line.startswith("| 1 |") for line in per_layer) == len(llama["layers"])
    assert per_layer[2].startswith("backend ")


def test_checkpoint_page_has_each_committed_models_recorded_run():
    from bench import checkpoint_tables

    lines = checkpoint_tables.page().splitlines()
    for folder in sorted(checkpoint_tables.MODELS.iterdir()):
        row = next(line for line in lines if line.startswith(f"| {folder.name} |"))
        if (folder / "training.json").exists():
            training = json.loads((folder / "training.json").read_text())
            assert f"{training['step']} steps, {training['tokens_seen'] / 1e6:.2f} M tokens" in row
        else:
            report = json.loads((folder / "sparsify_report.json").read_text())
            assert f"nearest-neighbour agreement {report['against_original']['neighbour_agreement']:.3f}" in row
            if report.get("held_out_text"):
                held = report["held_out_against_original"]
                assert f"on {report['held_out_text']}, a kind left out of training: cosine " in row
                assert f"agreement {held['neighbour_agreement']:.3f}" in row


def test_speed_tables_render_what_the_benchmarks_wrote(tiny_stores, tmp_path):
    from bench import speed_tables

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run(
        "bench",
        "layer",
        "--d-model",
        "1024",
        "--d-ff",
        "4096",
        "--batch",
        "1",
        "--k",
        "128",
        "--json",
        str(tmp_path / "bench_layer.jsonl"),
    )
    run(
        "bench",
        "e2e",
        str(tiny_stores["tiny-bert"]),
        "--text",
        str(text),
        "--batch",
        "2",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "bench_e2e.jsonl"),
    )
    # rendering only: a memory record of the benchmark's own type (the measurement is tested above)
    record = MemoryBenchResult(model="relu-lm", backend="lowrank", dense_mb=40.2, approx_mb=40.8, ratio=1.015)
    (tmp_path / "bench_memory.jsonl").write_text(json.dumps(record.to_json()) + "\n")
    rows = speed_tables.tables(tmp_path).splitlines()
    layer = json.loads((tmp_path / "bench_layer.jsonl").read_text())
    assert rows[0].startswith(f"Streaming memory bandwidth (array copy): {layer['bandwidth_gb_s']:.1f} GB/s")
    assert rows[4].startswith(f"| 1024×4096 | 1 | {layer['dense_path']} |") and "≥ 5×" in rows[4]
    assert rows[4].endswith(f"| {layer['search_us']:.0f} | {layer['overhead_us']:.0f} |")
    assert rows[-5].startswith("| tiny-bert | 2 |") and "embedding_cosine_mean" in rows[-5]
    assert rows[-1] == "| relu-lm | lowrank | 40.2 | 40.8 | 1.01× | ≤ 1.1× |"


def test_peers_sweep_reports_every_backend_with_consistent_fields(tiny_checkpoints, tmp_path):
    from bench import peers

    records = peers.run_model(
        str(tiny_checkpoints["llama"]), 8, ["ivf", "lowrank", "teal"], tmp_path, calibration_tokens=600, eval_tokens=300
    )
    assert {r["backend"] for r in records} == {"ivf", "lowrank", "teal"}
    assert (tmp_path / "peers_llama.jsonl").read_text().count("\n") == len(records)
    for points in peers.by_key(records, "backend", "layer").values():
        points.sort(key=lambda p: p["effort"])
        assert all(0 <= p["recall_at_k"] <= 1 and p["bytes_read_fraction"] > 0 for p in points)
        assert points[-1]["recall_at_k"] >= 0.99  # the largest effort is exhaustive for these three
        assert points[0]["bytes_read_fraction"] < points[-1]["bytes_read_fraction"]
        assert all(p["speedup"] == pytest.approx(p["dense_us"] / p["approx_us"], rel=0.01) for p in points)
        assert len({p["dense_us"] for p in points}) == 1  # one dense baseline per layer, shared by its points
    lines = peers.table(records).splitlines()
    assert len(lines) == 2 + 3 and [line.split(" | ")[1] for line in lines[2:]] == ["ivf", "lowrank", "teal"]
    assert all(line.endswith("/2 layers |") for line in lines[2:])
    assert [p.name for p in peers.plots(records, tmp_path)] == ["peers_llama.png", "peers_llama_speed.png"]
    # a later run of one backend replaces that backend's records and keeps the others'
    again = peers.run_model(
        str(tiny_checkpoints["llama"]), 8, ["teal"], tmp_path, calibration_tokens=600, eval_tokens=300
    )
    merged = [json.loads(line) for line in (tmp_path / "peers_llama.jsonl").read_text().splitlines()]
    assert len(merged) == len(records) and sorted(map(json.dumps, merged)) == sorted(
        map(json.dumps, [r for r in records if r["backend"] != "teal"] + again)
    )


def test_cli_bench_memory_sees_no_second_copy_of_the_keys(minilm_store, tmp_path):
    """IVF's lists are views of the model's own key rows (tests/test_store.py): loading the store
    must grow the process by the model and little more. Before, the lists held their own copy
    and the same measurement showed about one key table more (MiniLM: 1.147x)."""
    out = tmp_path / "memory.jsonl"
    proc = run("bench", "memory", str(minilm_store), "--repeats", "1", "--json", str(out))
    assert "ratio" in proc.stdout
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["backend"] == "ivf" and record["dense_mb"] > 80  # MiniLM holds 22.7 M float32 parameters
    # the ratio is of the unrounded sizes, the MB fields are rounded to 0.1 and the ratio to 0.001
    rounding = 0.05 / record["dense_mb"] * (1 + record["ratio"]) + 5e-4
    assert record["ratio"] == pytest.approx(record["approx_mb"] / record["dense_mb"], abs=rounding)
    key_mb = 6 * 1536 * 385 * 4 / 2**20  # six layers of (d_ff, d_model + 1) float32 keys
    assert record["approx_mb"] - record["dense_mb"] < 0.25 * key_mb


def test_memory_processes_start_with_one_malloc_arena(monkeypatch):
    """bench memory's processes see MALLOC_ARENA_MAX=1 (glibc reads it at start); the caller's
    environment is left as it was."""
    from ann_mlp.benchmark import _one_malloc_arena

    for before in (None, "4"):
        if before is None:
            monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
        else:
            monkeypatch.setenv("MALLOC_ARENA_MAX", before)
        with _one_malloc_arena(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            # os.getenv, not a function of this module: the spawned child then need not import the tests' modules
            assert pool.submit(os.getenv, "MALLOC_ARENA_MAX").result() == "1"
        assert os.getenv("MALLOC_ARENA_MAX") == before


def test_side_by_side_rows_differing_only_in_eval_options_share_a_store():
    from bench import side_by_side

    assert side_by_side.store_of("smollm2-exact-768-product").name == "smollm2-exact-768"
    assert side_by_side.store_of("smollm2-exact-768-product-tail").name == "smollm2-exact-768-tail"
    assert side_by_side.store_of("relu-lm-lowrank").name == "relu-lm-lowrank"
