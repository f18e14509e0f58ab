"""Our methods compose: ``fim-lora+filet+fw-lora`` allocates ranks, then initialises the adapters
of those ranks in their Fisher subspace, then trains with the Fisher-weighted penalty.

They compose because each acts at a different step of the Method protocol: a rank allocator
(``fim-lora`` or ``random-rank``) and ``filet`` in ``prepare`` (allocation first, so FILet
initialises adapters of their final size), ``fw-lora`` in ``prepare`` (its hooks), ``loss``,
``param_groups`` and ``after_backward``. The members run in that phase order whatever order the
name lists them in; every member writes its own report files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fisherlora.errors import ConfigError
from fisherlora.figures import Figure
from fisherlora.methods.base import AdapterMethod, Method

# Members that may be combined, by the phase they act in (lower first).
PHASES = {"fim-lora": 0, "random-rank": 0, "filet": 1, "fw-lora": 2}


def check_composition(
    names: Sequence[str], base: Callable[[str], str] = lambda name: name
) -> list[str]:
    """The member names in phase order; raises ``ConfigError`` for a combination that cannot be.
    ``base`` maps a named variant to the method it varies (a variant composes like it)."""
    if len(set(names)) != len(names):
        raise ConfigError(f"a method is named twice in {'+'.join(names)!r}")
    alien = [n for n in names if base(n) not in PHASES]
    if alien:
        raise ConfigError(
            f"{'+'.join(names)!r}: {alien} cannot be combined; only {sorted(PHASES)} (and their "
            "named variants) compose (the peers are PEFT's own implementations and each owns "
            "the whole adapter)"
        )
    allocators = [n for n in names if PHASES[base(n)] == 0]
    if len(allocators) > 1:
        raise ConfigError(f"{'+'.join(names)!r}: choose one rank allocator, not {allocators}")
    if len({base(n) for n in names}) != len(names):
        raise ConfigError(f"{'+'.join(names)!r} names one method twice (as itself and a variant)")
    return sorted(names, key=lambda n: PHASES[base(n)])


class Composed(AdapterMethod):
    """Several of our methods in one run; each protocol step calls every member in phase order."""

    def __init__(self, name: str, members: Sequence[Method]) -> None:
        self.name = name
        self.members = list(members)
        for member in self.members:  # its plots are titled with the method that was run
            member.run_name = name

    def prepare(
        self, model: PeftModel, calibration_loader: Iterable[dict[str, torch.Tensor]]
    ) -> dict[str, Any]:
        info: dict[str, Any] = {}
        for member in self.members:
            info[member.name] = member.prepare(model, calibration_loader)
        return info

    def param_groups(self, model: PeftModel, weight_decay: float) -> list[dict[str, Any]]:
        # Only fw-lora (in decay mode) shapes the groups; the others keep the plain ones.
        for member in self.members:
            if type(member).param_groups is not AdapterMethod.param_groups:
                return member.param_groups(model, weight_decay)
        return super().param_groups(model, weight_decay)

    def loss(self, model: PeftModel, step: int) -> torch.Tensor | None:
        terms = [t for m in self.members if (t := m.loss(model, step)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_backward(self, model: PeftModel, step: int) -> None:
        for member in self.members:
            member.after_backward(model, step)

    def save_report(self, out_dir: str | Path) -> None:
        for member in self.members:
            member.save_report(out_dir)

    def figures(self) -> list[Figure]:
        return [figure for member in self.members for figure in member.figures()]

    def state_dict(self) -> dict[str, Any]:
        return {member.name: member.state_dict() for member in self.members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for member in self.members:
            member.load_state_dict(state.get(member.name, {}))
