"""Layer groups on Ray Serve: the same tokens as one process, and what each hop adds.

    python bench/layer_groups.py                  # relu-lm in 2 groups on a local Ray instance
    python bench/layer_groups.py --write          # and rewrite docs/results/layer-groups.md

Decodes greedy continuations of a few prompts three ways, in turns: the whole model in this
process (`decode.generate`), its layer groups in this process (`LayerGroup`, no Ray), and the
groups as Ray Serve deployments, each step calling every group in turn through its handle.
Checks that all three give the same tokens, and reports ms per token; a group call through Ray
costs (Ray − in-process groups) / groups. Only a quiet machine gives meaningful times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.load import PROMPTS  # noqa: E402
from bench.pages import REPO, commit, head  # noqa: E402

PAGE = REPO / "docs" / "results" / "layer-groups.md"


def per_token_ms(decode, prompts: list[list[int]], new_tokens: int, turns: int) -> tuple[float, list[list[int]]]:
    """Median over turns of ms per new token, decoding every prompt alone; the tokens of the last turn."""
    times, tokens = [], []
    for _ in range(turns):
        start = time.perf_counter()
        tokens = [decode(prompt) for prompt in prompts]
        times.append((time.perf_counter() - start) * 1e3 / (new_tokens * len(prompts)))
    return statistics.median(times), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "indexes" / "relu-lm")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--mode", choices=["exact", "approx", "auto"], default="auto")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE.relative_to(REPO)}")
    args = parser.parse_args()
    started_at = commit()

    import ray
    from ray import serve

    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.decode import generate
    from ann_mlp.layer_groups import LayerGroup, pipeline_generate, split_points
    from server.layer_groups import deploy_groups, remove_groups

    torch.set_num_threads(1)  # every group on one thread, the whole model too: a like-for-like step
    whole = ApproxModel.open(args.store)
    model = whole.checkpoint.model
    prompts = [whole.checkpoint.tokenizer(text)["input_ids"] for text in PROMPTS]
    n = args.new_tokens

    def whole_model(prompt):
        if args.mode == "exact":
            return generate(model, [prompt], n, eos_token_id=None, pad_token_id=0)[0].tokens
        with whole.approximate(planned=args.mode == "auto"):
            return generate(model, [prompt], n, eos_token_id=None, pad_token_id=0)[0].tokens

    bounds = split_points(whole.checkpoint.adapter.num_layers(), args.groups)
    local = [LayerGroup(args.store, start, stop, args.mode) for start, stop in bounds]
    ray.init(num_cpus=args.groups, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        remote = deploy_groups(args.store, args.groups, mode=args.mode, cpus_per_group=1.0)
        rows = {}
        for name, decode in (
            ("whole model, one process", whole_model),
            ("layer groups, one process", lambda p: pipeline_generate(local, p, n)),
            (f"layer groups, {args.groups} Ray Serve deployments", lambda p: pipeline_generate(remote, p, n)),
        ):
            decode(prompts[0])  # warm up
            rows[name] = per_token_ms(decode, prompts, n, args.turns)
            print(f"{name}: {rows[name][0]:.2f} ms/token", flush=True)
        remove_groups(args.store, args.groups)
    finally:
        serve.shutdown()
        ray.shutdown()
    reference = next(iter(rows.values()))[1]
    same = all(tokens == reference for _, tokens in rows.values())
    base = rows["layer groups, one process"][0]
    ray_ms = rows[f"layer groups, {args.groups} Ray Serve deployments"][0]
    per_call = (ray_ms - base) / args.groups
    print(f"same tokens: {same}; a group call through Ray adds {per_call:.2f} ms")
    if args.write:
        command = "python bench/layer_groups.py " + " ".join(sys.argv[1:])
        table = [f"| {name} | {ms:.2f} |" for name, (ms, _) in rows.items()]
        PAGE.write_text(
            "\n".join(
                [
                    *head(
                        "Layer groups: one model as a pipeline of Ray Serve deployments", command.strip(), started_at
                    ),
                    f"Store `{args.store.name}`, layers split {bounds}, mode {args.mode}, torch on one thread in "
                    f"every process. {len(PROMPTS)} prompts × {n} greedy tokens, decoded one sequence at a time, "
                    f"median of {args.turns} turns. Each step calls the groups in turn through their handles: "
                    f"{args.groups} calls per token. Design: [../layer-groups.md](../layer-groups.md).",
                    "",
                    "| decoding | ms per token |",
                    "| --- | --- |",
                    *table,
                    "",
                    f"Same tokens all three ways: {'yes' if same else 'NO'}. A group call through Ray Serve adds "
                    f"{per_call:.2f} ms per token (Ray − in-process groups, over {args.groups} calls).",
                    "",
                ]
            )
        )
        print(f"wrote {PAGE}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
