"""``neuroada inspect``: what an adapter holds, as a one-screen text summary and a PNG report.

Read from the adapter folder: per layer the trainable count, the size of the deltas and, when indices were saved,
which input positions they read; the metric before and after training and the training loss from
``metrics.json`` and ``log_history.json`` in the run folder above the adapter, when they are there. The share of a
layer's inputs that the deltas read needs the layer's input width, which the command line takes from the base
model's config (``input_widths``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

_LAYER_NUMBER = re.compile(r"\.(\d+)\.")
_IN_BLOCK = re.compile(r"^.*?\.\d+\.")  # everything up to the block number: model.layers.3.


@dataclass
class LayerStats:
    name: str
    kind: str  # the name within its block: self_attn.q_proj, attention.output.dense, ...
    depth: int  # block number, -1 outside the numbered blocks (a pooler, a head)
    trainable: int
    delta_norm: float
    delta_max: float
    positions: np.ndarray | None  # selected input positions (flattened), if saved
    distinct_positions: int | None
    in_features: int | None = None  # the layer's input width, when the base model is known

    @property
    def delta_rms(self) -> float:
        """Root mean square of the deltas: comparable across layers of different sizes (weight units)."""
        return self.delta_norm / max(self.trainable, 1) ** 0.5

    @property
    def share_read(self) -> float | None:
        """Share of the layer's input features that at least one delta reads."""
        if self.distinct_positions is None or not self.in_features:
            return None
        return self.distinct_positions / self.in_features


@dataclass
class AdapterSummary:
    path: str
    config: dict
    layers: list[LayerStats]
    other_trainable: dict[str, int]  # modules_to_save etc.
    losses: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict | None = None  # metrics.json of the run: before/after

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
        shares = any(layer.share_read is not None for layer in self.layers)
        lines.append(f"  {'module':<{width}}{'layers':>7}{'deltas':>11}{'mean |delta|_2':>16}{'max |delta|':>13}"
                     + (f"{'inputs read':>13}" if shares else ""))
        for kind in self.kinds():
            group = [layer for layer in self.layers if layer.kind == kind]
            read = [g.share_read for g in group if g.share_read is not None]
            lines.append(f"  {kind:<{width}}{len(group):>7}{sum(g.trainable for g in group):>11,}"
                         f"{np.mean([g.delta_norm for g in group]):>16.4f}{max(g.delta_max for g in group):>13.4f}"
                         + (f"{np.mean(read):>12.1%}" if read else ""))
        largest = sorted(self.layers, key=lambda layer: -layer.delta_norm)[:3]
        lines.append("  largest updates: " + ", ".join(f"{layer.name} ({layer.delta_norm:.3f})" for layer in largest))
        if self.layers and self.layers[0].positions is None:
            lines.append("  indices were not saved (save_indices=False): no position statistics")
        if self.metrics and self.metrics.get("after"):
            name = _metric_name(self.metrics["after"])
            before = self.metrics.get("before")
            lines.append(f"  {name}: " + (f"{before[name]:.4f} before -> " if before else "")
                         + f"{self.metrics['after'][name]:.4f} after training")
        if self.losses:
            lines.append(f"  training loss: {self.losses[0][1]:.4f} at step {self.losses[0][0]} -> "
                         f"{self.losses[-1][1]:.4f} at step {self.losses[-1][0]}")
        return "\n".join(lines)

    def kinds(self) -> list[str]:
        """Module kinds in the order the layers are sorted (by block, then name)."""
        return list(dict.fromkeys(layer.kind for layer in self.layers))

    def grid(self, value) -> tuple[np.ndarray, list[str], list[str]]:
        """``value(layer)`` as a [module kind, block] table (NaN where a kind has no layer in a block); layers
        outside the numbered blocks get one last column."""
        kinds = self.kinds()
        blocks = sorted({layer.depth for layer in self.layers if layer.depth >= 0})
        outside = any(layer.depth < 0 for layer in self.layers)
        columns = [str(b) for b in blocks] + (["outside"] if outside else [])
        table = np.full((len(kinds), len(columns)), np.nan)
        for layer in self.layers:
            column = blocks.index(layer.depth) if layer.depth >= 0 else len(columns) - 1
            result = value(layer)
            table[kinds.index(layer.kind), column] = np.nan if result is None else result
        return table, kinds, columns


def adapter_summary(adapter_dir: str, input_widths: dict[str, int] | None = None) -> AdapterSummary:
    from safetensors.numpy import load_file

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
                in_features=(input_widths or {}).get(name),
            ))
        elif not key.rsplit(".", 1)[-1].startswith("neuroada_"):  # indices, pinned rows, base values
            module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
            other[module] = other.get(module, 0) + value.size
    layers.sort(key=lambda layer: (layer.depth < 0, layer.depth, layer.name))  # blocks first, in order
    return AdapterSummary(adapter_dir, config, layers, other, _losses(adapter_dir), _metrics(adapter_dir))


def _losses(adapter_dir: str) -> list[tuple[int, float]]:
    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "log_history.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [(entry["step"], entry["loss"]) for entry in json.load(handle) if "loss" in entry]


def _metrics(adapter_dir: str) -> dict | None:
    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _metric_name(values: dict) -> str:
    return next(name for name in ("accuracy", "exact_match", "matthews") if name in values) if any(
        name in values for name in ("accuracy", "exact_match", "matthews")) else next(iter(values))


def write_report(summary: AdapterSummary, output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = len(summary.grid(lambda layer: 0.0)[2])
    run_panels = bool(summary.losses or (summary.metrics and summary.metrics.get("after")))  # from a run folder
    figure, axes = plt.subplots(2 if run_panels else 1, 2, figsize=(min(22, max(14, 6 + 0.5 * blocks)),
                                                                    10 if run_panels else 5.5),
                                layout="constrained", squeeze=False,
                                gridspec_kw={"height_ratios": [1.3, 1] if run_panels else [1]})
    total = sum(layer.trainable for layer in summary.layers)
    head = sum(summary.other_trainable.values())
    figure.suptitle(f"NeuroAda adapter {summary.path}\nk={summary.config.get('k')}, "
                    f"{summary.config.get('selection')} selection: {total:,} deltas in {len(summary.layers)} layers"
                    + (f" + {head:,} parameters trained in full ({', '.join(sorted(summary.other_trainable))})"
                       if head else ""))

    _heatmap(figure, axes[0, 0], *summary.grid(lambda layer: layer.delta_rms),
             title="size of the update per layer", unit="RMS of the deltas (weight units)", percent=False)
    if summary.layers and summary.layers[0].positions is None:
        _note(axes[0, 1], "indices not saved (save_indices=False):\nno input statistics")
    elif all(layer.share_read is None for layer in summary.layers):
        _note(axes[0, 1], "input widths unknown: pass --model to neuroada inspect\nto see which share of each "
                          "layer's inputs the deltas read")
    else:
        _heatmap(figure, axes[0, 1], *summary.grid(lambda layer: layer.share_read),
                 title="share of each layer's inputs that its deltas read",
                 unit="share of the layer's input features (%)", percent=True)

    if run_panels:
        _run_panels(summary, axes[1, 0], axes[1, 1])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)


def _run_panels(summary: AdapterSummary, ax, loss_ax) -> None:
    """The metric before and after training, and the training loss, from the run folder."""
    if summary.metrics and summary.metrics.get("after"):
        name = _metric_name(summary.metrics["after"])
        before = summary.metrics.get("before")
        labels = (["before training"] if before else []) + ["after training"]
        values = ([before[name]] if before else []) + [summary.metrics["after"][name]]
        bars = ax.bar(labels, values, color=["#999999", "#1f77b4"][-len(values):], width=0.5)
        ax.bar_label(bars, fmt="%.3f")
        ax.set_ylim(0, max(1.0, max(values) * 1.15))
        examples = summary.metrics.get("test_examples")
        ax.set(title=f"{name} on the held-out test split" + (f" ({examples:,} examples)" if examples else ""),
               ylabel=f"{name} (fraction, 0-1)")
    else:
        _note(ax, "no metrics.json beside the adapter")

    ax = loss_ax
    if summary.losses:
        steps, losses = zip(*summary.losses)
        ax.plot(steps, losses, marker=".")
        ax.set(title="training loss (logged steps)", xlabel="optimizer step",
               ylabel="training loss (cross-entropy, nats)")
        ax.grid(alpha=0.3)
    else:
        _note(ax, "no log_history.json beside the adapter")


def _heatmap(figure, ax, table, rows, columns, title: str, unit: str, percent: bool) -> None:
    import matplotlib.pyplot as plt

    values = table * 100 if percent else table
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")  # grey: no layer of this kind in this block
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap,
                      vmin=0 if percent else None, vmax=100 if percent else None)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    step = max(1, len(columns) // 30)
    ticks = list(range(0, len(columns), step))
    if columns and columns[-1] == "outside" and len(columns) - 1 not in ticks:
        ticks.append(len(columns) - 1)
    ax.set_xticks(ticks, [columns[i] for i in ticks], fontsize=8, rotation=90 if columns[-1:] == ["outside"] and
                  len(columns) > 12 else 0)
    ax.set(title=title, xlabel="block (layer number in the model)", ylabel="module in the block")
    if len(columns) * len(rows) <= 120:
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.0f}%" if percent else f"{value:.2g}", ha="center", va="center",
                        fontsize=7, color="white" if value < middle else "black")
    figure.colorbar(image, ax=ax, label=unit)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
