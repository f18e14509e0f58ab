"""Draw what a method reports: the experiments layer's half of ``method.figures()``.

A method returns its figures as data (``fisherlora.figures``: FIM-LoRA's rank map, FW-LoRA's
importances, FILet's energy spectrum, each with its file name and title) and writes its JSON
files in ``save_report``; this module turns the data into PNGs in the run directory, so the
library layer never imports matplotlib or this package.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fisherlora.experiments import plots
from fisherlora.figures import EnergySpectrum, Figure, ModuleValues


def draw_figure(figure: Figure, out_dir: str | Path) -> Path:
    """Draw one figure into ``out_dir`` under its own file name; the path it was written to."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / figure.file
    if isinstance(figure, ModuleValues):
        plots.plot_module_values(
            figure.values,
            path,
            figure.title,
            label=figure.label,
            center=figure.center,
            integers=figure.integers,
        )
    elif isinstance(figure, EnergySpectrum):
        plots.plot_energy_spectrum(figure.energies, figure.selected, path, title=figure.title)
    else:
        raise TypeError(f"no drawing for a {type(figure).__name__}")
    return path


def draw_figures(figures: Iterable[Figure], out_dir: str | Path) -> list[Path]:
    """Draw every figure into ``out_dir``; the paths written."""
    return [draw_figure(figure, out_dir) for figure in figures]


def save_method_report(method: Any, out_dir: str | Path) -> list[Path]:
    """Everything a method reports, into its run directory: its own files (``save_report``:
    ``ranks.json``, ``filet.json``, ``fw_lora.json``, ...) and the figures it describes
    (``rank_map.png``, ``energy_spectrum.png``, ``importance.png``). A user's own method
    without ``figures`` draws nothing."""
    method.save_report(out_dir)
    figures = getattr(method, "figures", None)
    return draw_figures(figures() if figures is not None else [], out_dir)
