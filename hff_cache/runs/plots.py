"""PNG plots a person would rather look at than a table: training curves, learned layer weights, probes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_curves", "plot_layer_weights", "plot_probe", "plt", "save_figure"]

_LABELS = {"wer": "WER %", "cer": "CER %", "per": "PER %", "accuracy": "accuracy %"}


def panels(rows: Sequence[dict[str, Any]], key: str, width: float = 5.0, height: float = 3.5
           ) -> tuple[Any, list[tuple[Any, Any, list[dict[str, Any]]]]]:
    """One subplot per distinct ``row[key]`` (an encoder, a shape), side by side: (figure, [(axes, value, rows)])."""
    values = list(dict.fromkeys(r[key] for r in rows))
    n = max(len(values), 1)
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, [(ax, v, [r for r in rows if r[key] == v]) for ax, v in zip(axes[0], values, strict=False)]


def save_figure(fig: Any, path: str | Path) -> None:
    """Lay out, write (making the folder) and close: every PNG of the package and its benchmarks."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, metric: str = "wer") -> None:
    """Train/valid loss and the validation metrics per epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    valid = [(r["epoch"], r["valid_loss"]) for r in history if "valid_loss" in r]
    if valid:
        ax1.plot(*zip(*valid, strict=True), "s-", label="valid")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    for key in ("wer", "cer", "per", "accuracy"):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=_LABELS[key])
    ax2.set(xlabel="epoch", title=f"validation ({_LABELS.get(metric, metric)})")
    if ax2.lines:
        ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(fig, path)


def plot_layer_weights(weights: dict[str, Any], path: str | Path) -> None:
    """Bar chart of the learned softmax weight of each hidden state, one colour per fusion group."""
    w = list(weights["layer"])
    states = list(weights.get("hidden_states") or range(len(w)))
    groups = weights.get("groups") or [(0, len(w))]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(w) + 2), 3.5))
    for g, (s, e) in enumerate(groups):
        ax.bar([str(k) for k in states[s:e]], w[s:e], color=colours[g % len(colours)],
               label=f"group {g + 1}" if len(groups) > 1 else None)
    title = f"{weights.get('kind', '')} layer weights"
    if weights.get("group_gate") is not None:
        title += f" (ladder gate {weights['group_gate']:.2f})"
    ax.set(xlabel="hidden state", ylabel="softmax weight (within group)", title=title, ylim=(0, 1.05))
    if len(groups) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_probe(rows: Sequence[dict[str, Any]], path: str | Path, metrics: Sequence[str] = ("wer", "cer")) -> None:
    """Error rate of a probe trained on each hidden state alone."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.5))
    layers = [r["layer"] for r in rows]
    for key in metrics:
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(layers, vals, "o-", label=_LABELS.get(key, key))
    ax.set(xlabel="hidden state (0 = embedding)", ylabel="%", title="per-layer probe (validation)")
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
