"""What a method asks the reporting layer to draw: the data and its labels, no drawing.

A method knows its numbers (FIM-LoRA's ranks, FW-LoRA's importances, FILet's energy spectra) but
not matplotlib: ``method.figures()`` returns records of the classes below, each naming the file
it becomes in the run directory, and the experiments layer draws them
(``fisherlora.experiments.method_plots.draw_figures``). So imports run one way, from the
experiments layer down into the library, never back up.

Also here: how per-module values become a layer × module-type table (``module_grid``), which
``RankPlan.rank_table()`` returns and the heatmaps draw.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ModuleValues:
    """One number per module, drawn as a layer × module-type heatmap with each cell annotated.

    With ``center`` the colours diverge around it (ranks around the base rank); otherwise a
    sequential map. ``integers`` writes the cells without decimals.
    """

    file: str  # e.g. "rank_map.png", inside the run directory
    title: str
    values: Mapping[str, float]
    label: str  # the colour bar's label
    center: float | None = None
    integers: bool = False


@dataclass(frozen=True)
class EnergySpectrum:
    """Each module's candidate energies (one panel per module type, log scale), with the
    candidates it selected marked."""

    file: str  # e.g. "energy_spectrum.png"
    title: str
    energies: Mapping[str, list[float]]
    selected: Mapping[str, list[int]]


Figure = ModuleValues | EnergySpectrum


def layer_and_kind(name: str) -> tuple[str, str]:
    """Split a module name at its layer index: ``bert.encoder.layer.3.attention.self.query`` →
    ``("3", "attention.self.query")``; names without one (``bert.pooler.dense``) → ``("-", name)``
    shortened to its last two parts."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return part, ".".join(parts[i + 1 :]) or parts[i - 1]
    return "-", ".".join(parts[-2:])


def module_grid(values: Mapping[str, float]) -> pd.DataFrame:
    """Per-module values as a table: one row per layer (numeric order, un-numbered last), one
    column per module type (in order of first appearance)."""
    import pandas as pd

    rows = [(*layer_and_kind(name), value) for name, value in values.items()]
    frame = pd.DataFrame(rows, columns=["layer", "module", "value"])
    table = frame.pivot_table(
        index="layer", columns="module", values="value", aggfunc="first", sort=False
    )
    order = sorted(table.index, key=lambda layer: (layer == "-", int(layer) if layer != "-" else 0))
    return table.loc[order, list(dict.fromkeys(frame["module"]))]
