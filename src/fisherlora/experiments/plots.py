"""Plots written into run directories (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

# the module table lives in the library layer (RankPlan.rank_table returns it); re-exported here
from fisherlora.figures import layer_and_kind as layer_and_kind
from fisherlora.figures import module_grid as module_grid


def text_colour(rgba: Sequence[float]) -> str:
    """``"white"`` or ``"black"``, whichever reads better on a cell of colour ``rgba`` (floats in
    [0, 1]): white where the relative luminance (WCAG, linearised sRGB) is below 0.179, the
    point at which white and black have the same contrast ratio with the cell."""
    red, green, blue = (
        c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]
    )
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "white" if luminance < 0.179 else "black"


def plot_module_values(
    values: Mapping[str, float],
    path: str | Path,
    title: str,
    label: str,
    center: float | None = None,
    integers: bool = False,
) -> None:
    """Heatmap of one number per module (layer × module type), each cell annotated.

    With ``center`` the colours diverge around it (ranks around the base rank), so gains and
    losses read at a glance; otherwise a sequential map.
    """
    table = module_grid(values)
    cells = table.to_numpy(dtype=float)
    finite = cells[~np.isnan(cells)]
    if center is None:
        colour = {"cmap": "viridis", "vmin": float(finite.min()), "vmax": float(finite.max())}
    else:
        spread = max(1e-12, float(np.abs(finite - center).max()))
        colour = {"cmap": "RdBu", "vmin": center - spread, "vmax": center + spread}
    fig, ax = plt.subplots(figsize=(1.3 * table.shape[1] + 2.5, 0.45 * table.shape[0] + 1.8))
    image = ax.imshow(cells, aspect="auto", **colour)
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            if not np.isnan(cells[i, j]):  # NaN: a module type missing in this layer
                text = f"{int(cells[i, j])}" if integers else f"{cells[i, j]:.3g}"
                colour = text_colour(image.cmap(image.norm(cells[i, j])))
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_energy_spectrum(
    energies: Mapping[str, list[float]],
    selected: Mapping[str, list[int]],
    path: str | Path,
    title: str,
) -> None:
    """One panel per module type: each layer's candidate energies in decreasing order (log scale),
    the selected candidates marked with dots."""
    by_kind: dict[str, list[str]] = {}
    for name in energies:
        by_kind.setdefault(layer_and_kind(name)[1], []).append(name)
    fig, axes = plt.subplots(1, len(by_kind), figsize=(3.2 * len(by_kind), 3.2), squeeze=False)
    for ax, (kind, names) in zip(axes[0], by_kind.items(), strict=True):
        for name in names:
            values = pd.Series(energies[name])
            order = values.sort_values(ascending=False, kind="stable")
            rank_of = {index: position for position, index in enumerate(order.index)}
            (line,) = ax.plot(
                range(len(order)), order.to_numpy(), lw=1, label=layer_and_kind(name)[0]
            )
            chosen = [rank_of[i] for i in selected[name]]
            ax.plot(
                chosen, values.iloc[selected[name]].to_numpy(), ".", color=line.get_color(), ms=5
            )
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("candidate (by energy)")
    axes[0][0].set_ylabel("Fisher energy $p_i q_i$")
    axes[0][-1].legend(title="layer", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- comparison plots (fisherlora compare) -------------------------------------------------


def plot_learning_curves(
    curves: Mapping[str, list[pd.DataFrame]], path: str | Path, title: str
) -> None:
    """Held-out accuracy against the step (the NLL for a task without accuracy, -lm): the mean
    over seeds per method, with a ±1 std band."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    score = "accuracy"
    for method, frames in curves.items():
        if not frames:
            continue
        score = "accuracy" if all("accuracy" in f for f in frames) else "nll"
        table = pd.concat([f.set_index("step")[score] for f in frames], axis=1)
        mean, std = table.mean(axis=1), table.std(axis=1, ddof=1).fillna(0.0)
        ax.plot(mean.index, mean.values, marker="o", markersize=3, label=method)
        ax.fill_between(mean.index, (mean - std).values, (mean + std).values, alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out accuracy" if score == "accuracy" else "held-out NLL")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrices(
    matrices: Mapping[str, np.ndarray], class_names: list[str], path: str | Path, title: str
) -> None:
    """One panel per method: the confusion matrix summed over seeds, as row shares (recall)."""
    n = len(matrices)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    for ax, (method, matrix) in zip(list(axes.flat)[:n], matrices.items(), strict=True):
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            colour = text_colour(image.cmap(image.norm(shares[i, j])))
            ax.text(
                j,
                i,
                f"{shares[i, j]:.2f}\n({count})",
                ha="center",
                va="center",
                fontsize=7,
                color=colour,
            )
        ax.set_title(method, fontsize=8)
        ax.set_xticks(range(len(class_names)), class_names, fontsize=6)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(
    labels: list[str],
    values: list[float],
    errors: list[float] | None,
    path: str | Path,
    title: str,
    ylabel: str,
    reference: float | None = None,
) -> None:
    """One bar per method, with error bars (±1 std over seeds) and an optional reference line."""
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(labels) + 2), 3.8))
    x = np.arange(len(labels))
    ax.bar(x, values, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
    if reference is not None:
        ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1, label="LoRA")
        ax.legend(fontsize=7)
    finite = [v for v in values if np.isfinite(v)]
    if finite and ylabel.startswith("accuracy"):
        spread = [e for e in (errors or []) if np.isfinite(e)] or [0.0]
        ax.set_ylim(min(finite) - 3 * max(spread) - 0.01, max(finite) + 3 * max(spread) + 0.01)
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runtime_bars(
    labels: list[str], parts: Mapping[str, list[float]], path: str | Path, title: str
) -> None:
    """Stacked bars of where each method's time went (e.g. init, training, evaluation)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(labels) + 2), 3.8))
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for part, values in parts.items():
        ax.bar(x, values, bottom=bottom, label=part)
        bottom += np.asarray(values, dtype=float)
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("seconds (median over seeds)")
    ax.set_title(title)
    # outside the axes, right of them: inside, it covered the tallest bars (EVA's)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_grid(
    tuning: pd.DataFrame, picked: pd.DataFrame, path: Path, title: str, by: str = "accuracy"
) -> bool:
    """The validation score the picks were made by (``by``: accuracy, or NLL) against the
    learning rate, mean over tuning seeds, one line per method, the picked rate ringed;
    ``False`` (nothing drawn) when ``tuning`` is empty."""
    if tuning.empty:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    score = "val_accuracy" if by == "accuracy" else "val_nll"
    means = tuning.groupby(["method", "lr"], sort=True)[score].mean().reset_index()
    for method, group in means.groupby("method", sort=False):
        (line,) = ax.plot(group["lr"], group[score], marker="o", label=method)
        chosen = picked[picked["method"] == method] if not picked.empty else picked
        rank_match = (
            chosen[chosen["rank"] == tuning["rank"].iloc[0]] if not chosen.empty else chosen
        )
        if not rank_match.empty:
            lr = float(rank_match["lr"].iloc[0])
            at = group[group["lr"] == lr][score]
            if len(at):
                ax.scatter(
                    [lr], [float(at.iloc[0])], s=160, facecolors="none", edgecolors=line.get_color()
                )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    what = "accuracy" if score == "val_accuracy" else "NLL"
    ax.set_ylabel(f"validation {what} (mean over tuning seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_forest(
    pooled: pd.DataFrame,
    per_cell: pd.DataFrame,
    labels: Mapping[str, str],
    path: str | Path,
    title: str,
) -> None:
    """A forest plot of differences to a baseline: one panel per outcome (``labels``: column →
    axis label), one row per method; each cell's Δ as a faint point, the pooled Δ as a dot with
    its confidence interval as a bar, and a vertical line at 0 (no difference).

    ``pooled``: rows with ``method``, ``outcome``, ``delta``, ``ci_low``, ``ci_high``;
    ``per_cell``: rows with ``method``, ``outcome``, ``delta`` (one per cell)."""
    outcomes = [o for o in labels if (pooled["outcome"] == o).any()]
    methods = list(dict.fromkeys(pooled["method"]))
    panels = max(1, len(outcomes))
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(3.6 * panels + 1.5, 0.42 * len(methods) + 1.6),
        sharey=True,
        squeeze=False,
    )
    y = {m: len(methods) - 1 - i for i, m in enumerate(methods)}
    for ax, outcome in zip(axes[0], outcomes, strict=False):
        cells = per_cell[(per_cell["outcome"] == outcome) & per_cell["method"].isin(y)]
        ax.scatter(
            cells["delta"].to_numpy(dtype=float),
            [y[m] for m in cells["method"]],
            s=14,
            color="tab:gray",
            alpha=0.35,
            label="cell",
            zorder=2,
        )
        rows = pooled[pooled["outcome"] == outcome]
        delta = rows["delta"].to_numpy(dtype=float)
        low = np.maximum(delta - rows["ci_low"].to_numpy(dtype=float), 0.0)
        high = np.maximum(rows["ci_high"].to_numpy(dtype=float) - delta, 0.0)
        ax.errorbar(
            delta,
            [y[m] for m in rows["method"]],
            xerr=[np.nan_to_num(low), np.nan_to_num(high)],
            fmt="o",
            color="tab:blue",
            capsize=3,
            markersize=5,
            label="pooled (95 % CI)",
            zorder=3,
        )
        ax.axvline(0.0, color="black", linewidth=0.8)
        # symmetric about 0, so that which side a method falls on reads at a glance
        spread = np.nanmax(
            np.abs(
                np.concatenate([cells["delta"].to_numpy(dtype=float), delta - low, delta + high])
            )
        )
        spread = 1.15 * spread if np.isfinite(spread) and spread > 0 else 1e-3
        ax.set_xlim(-spread, spread)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5, symmetric=True))
        ax.set_xlabel(f"Δ {labels[outcome]}", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(list(y.values()), list(y.keys()), fontsize=7)
    axes[0][0].set_ylim(-0.7, len(methods) - 0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
