"""The layer benchmark runs and reports consistent fields (speed is asserted by benchmarks, not here)."""

from __future__ import annotations

import json

import pytest
import torch

from ann_mlp.benchmark import bench_layer, dense_paths, random_layer
from tests.test_cli import run


@pytest.mark.parametrize("gated", [False, True])
def test_dense_paths_agree(gated):
    weights = random_layer(32, 128, gated)
    x = torch.randn(3, 32)
    paths = dense_paths(weights)
    torch.testing.assert_close(torch.from_numpy(paths["numpy"](x)), paths["torch"](x), rtol=1e-4, atol=1e-5)


def test_bench_layer_fields_are_consistent():
    threads = torch.get_num_threads()
    result = bench_layer(64, 512, batch=2, k=32, repeats=30, threads=threads)
    assert result.dense_path in ("torch", "numpy")
    # fields are rounded (0.1 us, 4 decimals): compare at that precision
    assert result.speedup == pytest.approx(result.dense_us / result.approx_us, rel=0.05, abs=2e-4)
    assert 0 < result.bytes_read_fraction < 1
    assert result.dense_us > 0 and result.approx_us > 0 and result.repeats == 30


def test_cli_bench_layer_appends_json(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run("bench", "layer", "--d-model", "64", "--d-ff", "256", "--gated", "--batch", "1", "--batch", "4",
               "--k", "16", "--json", str(out))
    assert "random weights: timing only" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in records] == [1, 4]
    for r in records:
        assert {"d_model", "d_ff", "batch", "backend", "dense_us", "approx_us", "speedup",
                "bytes_read_fraction"} <= r.keys()
        assert r["d_model"] == 64 and r["d_ff"] == 256 and r["gated"] is True
