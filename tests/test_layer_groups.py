"""A causal LM cut into layer groups decodes the tokens of the whole model, in every family
the split knows, exactly and approximately."""

from __future__ import annotations

import pytest

from ann_mlp.approx_model import ApproxModel
from ann_mlp.decode import generate
from ann_mlp.errors import InputError
from ann_mlp.layer_groups import LayerGroup, pipeline_generate, split_points

PROMPT = [5, 9, 14, 20, 33, 41]


@pytest.fixture(scope="module", params=["opt", "gpt2", "qwen2"])
def causal_store(request, tiny_checkpoints, tmp_path_factory):
    from ann_mlp.build import build_store
    from ann_mlp.config import BuildConfig, TextConfig

    config = BuildConfig(backend="ivf", k=16, target_recall=0.9, calibration=TextConfig(max_tokens=400))
    out = tmp_path_factory.mktemp("groups") / request.param
    return build_store(str(tiny_checkpoints[request.param]), out, config, progress=False)


def whole_model_tokens(store, mode: str, new_tokens: int) -> list[int]:
    approx = ApproxModel.open(store)
    model = approx.checkpoint.model
    if mode == "exact":
        (continuation,) = generate(model, [PROMPT], new_tokens, eos_token_id=None, pad_token_id=0)
    else:
        with approx.approximate(planned=mode == "auto"):
            (continuation,) = generate(model, [PROMPT], new_tokens, eos_token_id=None, pad_token_id=0)
    return continuation.tokens


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_groups_decode_the_whole_models_tokens(causal_store, mode):
    num_layers = len(ApproxModel.open(causal_store).manifest.layers)  # the tiny models have 2: one per group
    parts = [LayerGroup(causal_store, start, stop, mode) for start, stop in split_points(num_layers, 2)]
    assert pipeline_generate(parts, PROMPT, 10) == whole_model_tokens(causal_store, mode, 10)
    assert all(part.caches == {} for part in parts)  # released when the sequence ends


def test_llama_groups_and_the_limits_of_a_split(tiny_stores):
    store = tiny_stores["tiny-llama"]
    parts = [LayerGroup(store, start, stop, "approx") for start, stop in split_points(2, 2)]
    assert pipeline_generate(parts, PROMPT, 8) == whole_model_tokens(store, "approx", 8)
    assert split_points(10, 3) == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(InputError, match="groups must be in"):
        split_points(2, 3)
    with pytest.raises(InputError, match="are not within"):
        LayerGroup(store, 1, 5)
    with pytest.raises(InputError, match="split a causal LM"):
        LayerGroup(tiny_stores["tiny-bert"], 0, 1)
