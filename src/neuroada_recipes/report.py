"""``neuroada inspect``: what an adapter holds, as a one-screen text summary and a PNG report.

Read from the adapter folder alone (no base model needed): per layer the trainable count, the delta norms and,
when indices were saved, the selected input positions; the training loss from ``log_history.json`` in the run
folder above the adapter, when it is there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load_file

_LAYER_NUMBER = re.compile(r"\.(\d+)\.")
_IN_BLOCK = re.compile(r"^.*?\.\d+\.")  # everything up to the block number: model.layers.3.


@dataclass
class LayerStats:
    name: str
    kind: str  # the name within its block: self_attn.q_proj, attention.output.dense, ...
    depth: int
    trainable: int
    delta_norm: float
    delta_max: float
    positions: np.ndarray | None  # selected input positions (flattened), if saved
    distinct_positions: int | None


@dataclass
class AdapterSummary:
    path: str
    config: dict
    layers: list[LayerStats]
    other_trainable: dict[str, int]  # modules_to_save etc.
    losses: list[tuple[int, float]] = field(default_factory=list)

    def text(self) -> str:
        total = sum(layer.trainable for layer in self.layers)
        lines = [
            f"adapter {self.path}",
            f"  NeuroAda k={self.config.get('k')} selection={self.config.get('selection')} "
            f"on {len(self.layers)} layers: {total:,} deltas"
            + (f", plus {sum(self.other_trainable.values()):,} parameters in {sorted(self.other_trainable)}"
               if self.other_trainable else ""),
        ]
        width = max([len(layer.kind) for layer in self.layers] + [6]) + 2
        lines.append(f"  {'module':<{width}}{'layers':>7}{'deltas':>11}{'mean |delta|_2':>16}{'max |delta|':>13}")
        for kind in sorted({layer.kind for layer in self.layers}):
            group = [layer for layer in self.layers if layer.kind == kind]
            lines.append(f"  {kind:<{width}}{len(group):>7}{sum(g.trainable for g in group):>11,}"
                         f"{np.mean([g.delta_norm for g in group]):>16.4f}{max(g.delta_max for g in group):>13.4f}")
        largest = sorted(self.layers, key=lambda layer: -layer.delta_norm)[:3]
        lines.append("  largest updates: " + ", ".join(f"{layer.name} ({layer.delta_norm:.3f})" for layer in largest))
        if self.layers and self.layers[0].positions is None:
            lines.append("  indices were not saved (save_indices=False): no position statistics")
        if self.losses:
            lines.append(f"  training loss: {self.losses[0][1]:.4f} at step {self.losses[0][0]} -> "
                         f"{self.losses[-1][1]:.4f} at step {self.losses[-1][0]}")
        return "\n".join(lines)


def adapter_summary(adapter_dir: str) -> AdapterSummary:
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing; give a folder written by save_pretrained")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        config = json.load(handle)
    tensors = load_file(weights)
    layers, other = [], {}
    for key, value in tensors.items():
        if key.endswith(".neuroada_delta"):
            name = key.removeprefix("base_model.model.").removesuffix(".neuroada_delta")
            indices = tensors.get(key.replace("neuroada_delta", "neuroada_indices"))
            depth = _LAYER_NUMBER.search(f".{name}.")
            layers.append(LayerStats(
                name=name, kind=_IN_BLOCK.sub("", name), depth=int(depth.group(1)) if depth else -1,
                trainable=value.size, delta_norm=float(np.linalg.norm(value)), delta_max=float(np.abs(value).max()),
                positions=None if indices is None else indices.astype(np.int64).ravel(),
                distinct_positions=None if indices is None else int(np.unique(indices).size),
            ))
        elif not key.endswith(".neuroada_indices"):
            module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
            other[module] = other.get(module, 0) + value.size
    layers.sort(key=lambda layer: (layer.depth, layer.name))
    return AdapterSummary(adapter_dir, config, layers, other, _losses(adapter_dir))


def _losses(adapter_dir: str) -> list[tuple[int, float]]:
    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "log_history.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [(entry["step"], entry["loss"]) for entry in json.load(handle) if "loss" in entry]


def write_report(summary: AdapterSummary, output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({layer.kind for layer in summary.layers})
    colors = {kind: plt.cm.tab10(i % 10) for i, kind in enumerate(kinds)}
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    figure.suptitle(f"NeuroAda adapter {summary.path}: k={summary.config.get('k')}, "
                    f"{sum(layer.trainable for layer in summary.layers):,} deltas in {len(summary.layers)} layers")

    ax = axes[0, 0]
    ax.bar(range(len(summary.layers)), [layer.delta_norm for layer in summary.layers],
           color=[colors[layer.kind] for layer in summary.layers])
    ax.set(title="delta norm per layer (by depth)", xlabel="layer (ordered by depth)", ylabel="||delta||_2")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds], labels=kinds, fontsize=8)

    ax = axes[0, 1]
    counts = [sum(layer.trainable for layer in summary.layers if layer.kind == kind) for kind in kinds]
    names = kinds + sorted(summary.other_trainable)
    values = counts + [summary.other_trainable[m] for m in sorted(summary.other_trainable)]
    ax.barh(names, values, color=[colors.get(n, "grey") for n in names])
    ax.set(title="trainable parameters by module", xlabel="parameters")
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,}", va="center", fontsize=8)

    ax = axes[1, 0]
    if summary.layers and summary.layers[0].positions is not None:
        for kind in kinds:
            positions = np.concatenate([layer.positions for layer in summary.layers if layer.kind == kind])
            ax.hist(positions, bins=64, histtype="step", color=colors[kind], label=kind)
        ax.set(title="selected input positions", xlabel="input position", ylabel="selected entries")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "indices not saved (save_indices=False)", ha="center", va="center")
        ax.set_axis_off()

    ax = axes[1, 1]
    if summary.losses:
        steps, losses = zip(*summary.losses)
        ax.plot(steps, losses, marker=".")
        ax.set(title="training loss", xlabel="step", ylabel="loss")
    else:
        ax.text(0.5, 0.5, "no log_history.json beside the adapter", ha="center", va="center")
        ax.set_axis_off()

    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
