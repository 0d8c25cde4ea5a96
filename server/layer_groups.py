"""Layer groups on Ray Serve: one deployment per contiguous run of decoder layers, a pipeline.

Each group deployment holds its layers (`ann_mlp.layer_groups.LayerGroup`) and its sequences'
KV caches; a step sends the token to the first group and each group's hidden state (d_model
floats per token, through Ray's object store) to the next, the last answering logits. The
groups of one model run on whatever nodes have room, so a model larger than one machine's
memory can be served by several machines. A prototype: one sequence at a time, greedy
(docs/layer-groups.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ann_mlp.layer_groups import LayerGroup, Mode, split_points
from ann_mlp.store import Store


class LayerGroupDeployment:
    """A Ray Serve replica holding one layer group."""

    def __init__(self, store: str, start: int, stop: int, mode: Mode, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.group = LayerGroup(store, start, stop, mode)

    def forward(self, sequence: str, inputs: np.ndarray) -> np.ndarray:
        return self.group.forward(sequence, torch.from_numpy(inputs.copy())).numpy()  # Ray hands over read-only arrays

    def release(self, sequence: str) -> None:
        self.group.release(sequence)


class RemoteGroup:
    """A deployed group as `pipeline_generate` calls it: each call one hop through Ray."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def forward(self, sequence: str, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.handle.forward.remote(sequence, inputs.numpy()).result())  # a copy: Ray's is read-only

    def release(self, sequence: str) -> None:
        self.handle.release.remote(sequence).result()


def group_names(store: str | Path, groups: int) -> list[tuple[str, int, int]]:
    """(application name, start, stop) of each group, in pipeline order; the store is verified."""
    store = Path(store).resolve()
    num_layers = len(Store.open(store).manifest.layers)
    return [(f"{store.name}-layers-{start}-{stop}", start, stop) for start, stop in split_points(num_layers, groups)]


def deploy_groups(
    store: str | Path, groups: int, mode: Mode = "auto", cpus_per_group: float = 1.0, torch_threads: int = 1
) -> list[RemoteGroup]:
    """Deploy a store's causal LM as `groups` layer-group applications on the connected Ray
    cluster (ray.init first); returns them in pipeline order. Each reserves `cpus_per_group`."""
    from ray import serve

    path = str(Path(store).resolve())  # a group may start on another node, at another working directory
    deployed = []
    for name, start, stop in group_names(store, groups):
        deployment = serve.deployment(LayerGroupDeployment, name=name, ray_actor_options={"num_cpus": cpus_per_group})
        handle = serve.run(deployment.bind(path, start, stop, mode, torch_threads), name=name, route_prefix=None)
        deployed.append(RemoteGroup(handle))
    return deployed


def remove_groups(store: str | Path, groups: int) -> None:
    """Take down the applications `deploy_groups` made."""
    from ray import serve

    for name, _, _ in group_names(store, groups):
        serve.delete(name)
