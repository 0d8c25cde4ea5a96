"""The `ann-mlp` command end to end, on the real MiniLM checkpoint and on bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from ann_mlp.checkpoint.builtin import resolve_builtin

TEXT = """The quick brown fox jumps over the lazy dog near the river bank.

A database index speeds up lookups at the cost of extra writes and storage.

Photosynthesis converts light energy into chemical energy stored in glucose.

The treaty was signed after months of negotiation between the two governments.

Neural networks learn representations by adjusting weights with gradient descent.

She played the cello every evening, and the neighbours never once complained.
"""


def run_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ann-mlp ARGS` as a process of its own, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ann-mlp ARGS` through the console script's main() in this process, as a finished process:
    the same code path as run_process without a new interpreter's seconds of imports per call."""
    from unittest import mock

    from server.cli import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["ann-mlp", *args]), redirect_stdout(out), redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_build_and_eval_minilm_report_contract(minilm_store, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    proc = run("eval", str(minilm_store), "--text", str(text), "--json", str(report_path), "--plots", str(plots))
    assert "recall_at_k" in proc.stdout and "embedding_cosine_mean" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["model"] == "minilm" and report["backend"] == "ivf" and report["k"] == 64
    assert len(report["layers"]) == 6
    for layer in report["layers"]:
        assert {"layer", "d_ff", "recall_at_k", "mass_recall", "scanned_fraction", "rel_output_error"} <= layer.keys()
        assert layer["d_ff"] == 1536
        assert 0 <= layer["recall_at_k"] <= 1 and 0 < layer["scanned_fraction"] <= 1
        assert layer["rel_output_error"] > 0  # GELU's tail: top-64 of 1536 is never exact
    e2e = report["end_to_end"]
    assert -1 <= e2e["embedding_cosine_min"] <= e2e["embedding_cosine_mean"] <= 1
    assert 0 <= e2e["neighbour_agreement"] <= 1 and e2e["sentences"] == 6
    assert list(plots.glob("*.png"))


def test_eval_with_full_effort_and_k_is_exact(minilm_store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report_path = tmp_path / "r.json"
    run("eval", str(minilm_store), "--text", str(text), "--k", "1536", "--effort", "64", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert all(layer["recall_at_k"] == 1.0 and layer["rel_output_error"] < 1e-5 for layer in report["layers"])
    assert report["end_to_end"]["embedding_cosine_min"] > 0.99999


def test_eval_another_backend_built_in_memory(minilm_store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report_path = tmp_path / "r.json"
    run("eval", str(minilm_store), "--text", str(text), "--backend", "exact", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["backend"] == "exact"
    assert all(layer["recall_at_k"] == 1.0 and layer["scanned_fraction"] == 1.0 for layer in report["layers"])


def test_eval_on_two_texts_reports_the_shift_between_them(minilm_store, tmp_path):
    """--shift-text evaluates the store on a second text in the same run and prints each measure on
    the first, on the second and the change, as the JSON's two reports give them."""
    first, second = tmp_path / "docstrings.txt", tmp_path / "prose.txt"
    first.write_text(TEXT)
    second.write_text(
        "The river ran high after the spring rains, and the ferry waited on the far bank.\n\n"
        "She counted the lanterns along the harbour wall, nine of them, one unlit.\n\n"
        "By noon the market square was loud with carts, goats and the smell of bread.\n"
    )
    report_path = tmp_path / "r.json"
    proc = run("eval", str(minilm_store), "--text", str(first), "--shift-text", str(second), "--json", str(report_path))
    report = json.loads(report_path.read_text())
    shifted = report["extra"]["text_shift"]
    assert shifted["text"]["source"] != report["text"]["source"] and len(shifted["layers"]) == 6
    shift = proc.stdout[proc.stdout.index("text shift:") :].splitlines()
    for before, after in zip(report["layers"], shifted["layers"]):
        line = next(row for row in shift[2:] if row.split()[0] == str(before["layer"]))
        a, b = before["recall_at_k"], after["recall_at_k"]
        assert f"{a:.4f} -> {b:.4f} ({b - a:+.4f})" in line
    a, b = report["end_to_end"]["neighbour_agreement"], shifted["end_to_end"]["neighbour_agreement"]
    assert any(row.split()[0] == "neighbour_agreement" and f"({b - a:+.4f})" in row for row in shift)

    # A named source stands for its evaluation split.
    run("eval", str(minilm_store), "--text", "licenses", "--max-tokens", "300", "--json", str(report_path))
    assert json.loads(report_path.read_text())["text"]["source"] == "licenses:evaluation"


def test_info_verifies_and_prints_the_manifest(minilm_store):
    manifest = json.loads(run("info", str(minilm_store)).stdout)
    assert manifest["family"] == "bert" and len(manifest["layers"]) == 6


def test_bad_input_gives_one_line_errors(minilm_store, tiny_checkpoints, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bert"}')
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "bert"}')
    no_tokenizer = tmp_path / "no_tokenizer"  # what model.save_pretrained() alone writes
    no_tokenizer.mkdir()
    for part in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoints["opt"] / part, no_tokenizer / part)
    truncated = tmp_path / "truncated.gguf"
    with open(resolve_builtin("smollm2"), "rb") as whole:
        truncated.write_bytes(whole.read(1 << 20))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    out = tmp_path / "out"
    cases = [
        (("build", str(no_tokenizer), "--out", str(out)), "has no tokenizer"),
        (("build", str(truncated), "--out", str(out)), "truncated.gguf is not a readable GGUF file"),
        (
            ("serve", str(minilm_store), "--port", str(taken.getsockname()[1])),
            "Address already in use (another server may hold it",
        ),
        (("serve", str(minilm_store), "--replicas", "0"), "--replicas or ANN_MLP_REPLICAS: Input should be greater"),
        (("serve", str(minilm_store), "--replicas", "3", "--max-replicas", "2"), "must lie within"),
        (("serve", str(minilm_store), "--ray-address", "auto"), "--ray-address needs --replicas"),
        (("build", str(no_weights), "--out", str(out)), "no .safetensors"),
        (("build", str(pickled), "--out", str(out)), "refusing pickled weights"),
        (("build", str(tiny_checkpoints["opt"]), "--out", str(out), "--k", "97"), "exceeds d_ff=96"),
        (("build", str(tiny_checkpoints["opt"]), "--out", str(out), "--target-recall", "1.5"), "target recall"),
        (("build", str(tiny_checkpoints["opt"]), "--out", str(out), "--backend", "annoy"), "unknown backend"),
        (("build", str(tiny_checkpoints["opt"]), "--out", str(out), "--tail-map-rank", "-1"), "tail map rank"),
        (("build", str(tiny_checkpoints["opt"]), "--out", str(out), "--k", "8", "--calib-text", str(empty)), "empty"),
        (
            (
                "build",
                str(tiny_checkpoints["opt"]),
                "--out",
                str(out),
                "--k",
                "8",
                "--calib-text",
                str(tmp_path / "none.txt"),
            ),
            "cannot read",
        ),
        (
            ("build", str(tiny_checkpoints["opt"]), "--out", str(out), "--check-text", str(tmp_path / "none.txt")),
            "cannot read",
        ),
        (("eval", str(minilm_store), "--text", "nosuchsource"), "cannot read"),
        (("eval", str(minilm_store), "--text", str(empty)), "empty"),
        (("eval", str(minilm_store), "--k", "5000"), "k must be in"),
        (("eval", str(minilm_store), "--candidate-factor", "0.5"), "candidate factor"),
        (("eval", str(minilm_store), "--checkpoint", str(tiny_checkpoints["bert"])), "built from other weights"),
        (("eval", str(tmp_path)), "not an index store"),
        (("bench", "memory", str(tmp_path)), "not an index store"),
        (("sparsity", str(no_weights)), "no .safetensors"),
        (("bench", "layer", "--d-model", "8", "--d-ff", "64", "--probe-fraction", "2"), "probe fraction"),
        (("bench", "layer", "--d-model", "8", "--d-ff", "64", "--k", "65"), "k must be in"),
        (("bench", "layer", "--d-model", "0", "--d-ff", "64"), "must be positive"),
        (("bench", "layer", "--d-model", "8", "--d-ff", "64", "--batch", "1", "--batch", "0"), "must be positive"),
        (("sparsity", str(tiny_checkpoints["opt"]), "--text", str(empty)), "empty"),
    ]
    assert_one_line_error(run_process(*cases[0][0], check=False), cases[0][1])  # once as its own process
    for args, match in cases[1:]:  # the rest in this process
        assert_one_line_error(run(*args, check=False), match)
    taken.close()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_build_defaults_to_the_low_rank_backend(tiny_checkpoints, tmp_path):
    """With no --backend, build picks lowrank (the fewest bytes at the target recall on every
    checkpoint measured) with a per-query margin and 8-bit re-ranking, tuned to recall 0.99, and
    stores no float32 copy of the keys, only its projection and codes."""
    out = tmp_path / "store"
    notes = tmp_path / "notes.txt"
    notes.write_text("A calibration text of another kind, mixed in turn with the docstrings.\n")
    built = run(
        "build",
        str(tiny_checkpoints["gpt2"]),
        "--out",
        str(out),
        "--k",
        "8",
        "--calib-tokens",
        "400",
        "--calib-text",
        "stdlib",
        "--calib-text",
        str(notes),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["sources"] == ["stdlib", str(notes.resolve())]
    assert (
        manifest["calibration"]["text"]
        == f"python-stdlib-docstrings:calibration + {notes} (one passage per line (no blank lines))"
    )
    assert manifest["backend"] == "lowrank" and manifest["target_recall"] == 0.99
    assert all(
        layer["effort_param"] == "margin"
        and {name: layer["build_params"][name] for name in ("margin_rank", "rerank_bits", "kept_bits")}
        == {"margin_rank": 16, "rerank_bits": 8, "kept_bits": 8}
        and layer["k"] == 8
        for layer in manifest["layers"]
    )
    stored = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert any(name.endswith(".projection.faiss") for name in stored)
    assert any("key_codes" in name for name in stored)  # 8-bit codes, not a float32 copy of the keys
    assert not any("keys" in name and "key_codes" not in name for name in stored)
    # build-time recall on another kind of text beside the calibration's held-out tokens
    assert manifest["calibration"]["check_text"] == "licenses:evaluation"
    assert manifest["calibration"]["check_tokens"] > 0
    assert all(0 <= layer["check_recall"] <= 1 for layer in manifest["layers"])
    first = manifest["layers"][0]
    assert f"={first['build_recall']:.3f} (on licenses:evaluation: {first['check_recall']:.3f})" in built.stdout
    added = sum(p.stat().st_size for p in out.iterdir() if p.name != "manifest.json")
    weights = (tiny_checkpoints["gpt2"] / "model.safetensors").stat().st_size
    assert f"its files add {added / 2**20:.1f} MB to the checkpoint's {weights / 2**20:.1f} MB" in built.stdout
    unchecked = tmp_path / "unchecked"
    run("build", str(tiny_checkpoints["gpt2"]), "--out", str(unchecked), "--k", "8", "--calib-tokens", "400",
        "--check-text", "none", "--no-plan")  # fmt: skip
    manifest = json.loads((unchecked / "manifest.json").read_text())
    assert manifest["calibration"]["check_text"] is None
    assert all(layer["check_recall"] is None for layer in manifest["layers"])


def test_low_rank_margin_build_and_eval_by_margin(tiny_checkpoints, tmp_path):
    """--param margin_rank=N builds lowrank with a per-query margin: the manifest's effort is
    `margin` (tuned, in hundredths of σ_q), each layer stores its error basis (8-bit codes), and eval's
    --effort sets the margin: at 0 only the k best by approximate score are re-ranked."""
    out = tmp_path / "store"
    run(
        "build",
        str(tiny_checkpoints["gpt2"]),
        "--out",
        str(out),
        "--k",
        "8",
        "--calib-tokens",
        "400",
        "--param",
        "margin_rank=8",
        "--param",  # candidates re-ranked from the float32 keys: recall grows with the margin alone
        "rerank_bits=32",
        "--param",
        "kept_bits=32",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    for layer in manifest["layers"]:
        assert layer["effort_param"] == "margin" and layer["effort_range"] == [0, 2000]
        assert layer["build_params"]["margin_rank"] == 8 and 0 <= layer["search_params"]["margin"] <= 2000
        assert any(name.endswith(".error_basis_codes.npy") for name in layer["files"])
    reports = {}
    for effort in ("0", "2000"):
        run("eval", str(out), "--effort", effort, "--max-tokens", "256", "--json", str(tmp_path / f"{effort}.json"))
        reports[effort] = json.loads((tmp_path / f"{effort}.json").read_text())["layers"]
    for least, most in zip(reports["0"], reports["2000"]):
        assert least["bytes_read_fraction"] < most["bytes_read_fraction"]
        assert least["recall_at_k"] <= most["recall_at_k"] and most["recall_at_k"] > 0.99


def test_serve_sets_the_passive_wait_policy_before_torch_loads(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, when torch is imported: serve must set it first,
    and leave a value the user gave alone."""
    probe = (
        "import os, sys\n"
        "from unittest import mock\n"
        "seen = []\n"
        "import importlib.machinery\n"
        "class WatchTorch:  # the policy in force when torch's module runs\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name != 'torch':\n"
        "            return None\n"
        "        spec = importlib.machinery.PathFinder.find_spec(name, path)\n"
        "        run = spec.loader.exec_module\n"
        "        def exec_module(module):\n"
        "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "            run(module)\n"
        "        spec.loader.exec_module = exec_module\n"
        "        return spec\n"
        "sys.meta_path.insert(0, WatchTorch())\n"
        "from server.cli import main\n"
        f"with mock.patch.object(sys, 'argv', ['ann-mlp', 'serve', {str(tmp_path / 'missing')!r}]):\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(*seen)\n"
    )
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
        assert proc.stdout.split() == [expected], proc.stderr[-2000:]
