"""Our methods compose: ``fim-lora+filet+fw-lora`` allocates ranks, then initialises the adapters
of those ranks in their Fisher subspace, then trains with the Fisher-weighted penalty.

They compose because each acts at a different step of the Method protocol: a rank allocator
(``fim-lora`` or ``random-rank``) and ``filet`` in ``prepare`` (allocation first, so FILet
initialises adapters of their final size), ``fw-lora`` in ``prepare`` (its hooks), ``loss``,
``param_groups`` and ``after_backward``. The members run in that phase order whatever order the
name lists them in; every member writes its own report files.

One calibration: ``fim-lora+filet`` runs FIM-LoRA's passes only, with FILet's hooks in them.
FIM-LoRA calibrates at B = 0, where every adapted layer computes exactly the base model's
function (and so does the whole model, dropout off), so each layer's input x and output gradient
g are the ones FILet's own passes would see on the same batches; FILet's energies
``e_i = p_i q_i`` do not depend on the ranks, only which r_m of them are selected does. So the
passes collect FIM-LoRA's ``(∂L/∂B)²`` and FILet's ``p``, ``q`` together, FIM-LoRA allocates the
ranks, and FILet selects r_m candidates per layer from the same statistics: the ranks, A, B and
base weights are those of running ``fim-lora`` and then ``filet`` apart on the same batches
(a test holds it). Both read the first ``calib_batches`` batches of the calibration loader; apart,
FILet would read the loader a second time, which a reshuffling loader (the runner's) fills with
other batches. The passes are shared only where both calibrate every layer at once with the same
number of batches (no ``layers_per_pass``); otherwise each runs its own, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fisherlora.adapters import adapter_sizes_restored_on_error
from fisherlora.errors import ConfigError
from fisherlora.figures import Figure
from fisherlora.methods.base import AdapterMethod, Method
from fisherlora.methods.filet import CandidateEnergies, Filet
from fisherlora.methods.fim_lora import FimLoRA, rank_bounds
from fisherlora.methods.fw_lora import FwLoRA

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


def _check_candidates_cover_ranks(
    model: PeftModel, fim: FimLoRA, collected: CandidateEnergies
) -> None:
    """Refuse, before the allocator changes the model, a layer whose usable FILet candidates are
    fewer than the largest rank the allocator may give it (FILet would refuse it afterwards,
    with the adapters already resized)."""
    _, high = rank_bounds(
        model,
        budget=fim.options.get("budget", "ranks"),
        r_min=fim.options.get("r_min"),
        r_max=fim.options.get("r_max"),
    )
    short = {n: c.sigma.numel() for n, c in collected.candidates.items() if c.sigma.numel() < high}
    if short:
        raise ConfigError(
            f"{fim.name}+filet: the allocator may give a layer up to {high} ranks, but "
            f"{', '.join(f'{n} has {k}' for n, k in list(short.items())[:3])} usable FILet "
            "candidates (a rank-deficient weight); lower r_max to at most "
            f"{min(short.values())}"
        )


class Composed(AdapterMethod):
    """Several of our methods in one run; each protocol step calls every member in phase order."""

    def __init__(
        self, name: str, members: Sequence[Method], share_calibration: bool = True
    ) -> None:
        self.name = name
        self.members = list(members)
        # FW-LoRA's decay form pulls A, B to zero, i.e. a residual model to W − s B₀ A₀
        # (FisherPenalty refuses it too, but only after FILet would have rewritten the weights)
        if any(isinstance(m, Filet) for m in self.members) and any(
            isinstance(m, FwLoRA) and m.options["mode"] == "decay" for m in self.members
        ):
            raise ConfigError(
                f"{name!r}: FW-LoRA's mode='decay' cannot follow FILet (its weight decay would "
                "pull the model toward W - s B0 A0, not the pretrained W); use mode='loss'"
            )
        # fim-lora+filet: one set of calibration passes for both (module docstring)
        self.share_calibration = share_calibration
        for member in self.members:  # its plots are titled with the method that was run
            member.run_name = name

    def _calibration_pair(self) -> tuple[FimLoRA, Filet] | None:
        """The rank allocator and FILet whose calibrations can be one, if there are such."""
        allocators = [m for m in self.members if isinstance(m, FimLoRA) and m.calibrates]
        filets = [m for m in self.members if isinstance(m, Filet)]
        if not (self.share_calibration and allocators and filets):
            return None
        fim, filet = allocators[0], filets[0]
        same_batches = fim.options["n_batches"] == filet.options["n_batches"]
        ungrouped = fim.options["layers_per_pass"] is None
        return (fim, filet) if same_batches and ungrouped else None

    def prepare(
        self, model: PeftModel, calibration_loader: Iterable[dict[str, torch.Tensor]]
    ) -> dict[str, Any]:
        """Each member's ``prepare`` in phase order. If one refuses after the allocator resized
        the adapters (FILet on a layer with fewer usable candidates than its new rank, or with
        zero energies), the sizes are put back: the model is left as it was given."""
        info: dict[str, Any] = {}
        pair = self._calibration_pair()
        collected: CandidateEnergies | None = None
        if pair is not None:
            # None where FILet is grouped
            collected = pair[1].calibration_statistic(model, calibration_loader)
            if collected is not None:  # before the allocator resizes anything
                _check_candidates_cover_ranks(model, pair[0], collected)
        with adapter_sizes_restored_on_error(model):
            for member in self.members:
                if collected is not None and member is pair[0]:
                    info[member.name] = member.prepare(
                        model, calibration_loader, also_collect=[collected]
                    )
                    collected.calibration_s = member.plan.calibration_s
                elif collected is not None and member is pair[1]:
                    info[member.name] = member.prepare(
                        model, calibration_loader, collected=collected, collected_by=pair[0].name
                    )
                else:
                    info[member.name] = member.prepare(model, calibration_loader)
        return info

    def param_groups(self, model: PeftModel, weight_decay: float) -> list[dict[str, Any]]:
        # Only fw-lora (in decay mode) shapes the groups; the others keep the plain ones.
        for member in self.members:
            if type(member).param_groups is not AdapterMethod.param_groups:
                return member.param_groups(model, weight_decay)
        return super().param_groups(model, weight_decay)

    def optimizer_ready(self, optimizer: torch.optim.Optimizer) -> None:
        for member in self.members:
            member.optimizer_ready(optimizer)

    def loss(self, model: PeftModel, step: int) -> torch.Tensor | None:
        terms = [t for m in self.members if (t := m.loss(model, step)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_backward(self, model: PeftModel, step: int) -> None:
        for member in self.members:
            member.after_backward(model, step)

    def start_training(self, model: PeftModel) -> None:
        for member in self.members:
            member.start_training(model)

    def end_training(self, model: PeftModel) -> None:
        for member in self.members:
            member.end_training(model)

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
