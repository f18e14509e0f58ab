"""Methods by name. Each is a small object with the steps of :class:`~fisherlora.methods.base.Method`.

Ours: ``fim-lora``, ``filet``, ``fw-lora`` (and their ``+`` compositions, e.g.
``fim-lora+filet+fw-lora``) and the ``random-rank`` control. The peers, through PEFT's own
implementations: ``lora``, ``dora``, ``pissa``, ``eva``, ``lora-ga``, ``corda``, ``adalora``.

A method's name runs the paper's method. A departure from it is a *named variant* (``VARIANTS``):
the same method with some options fixed, which a comparison can run beside the original (and
compose like it, e.g. ``fim-lora-batch+filet-svd``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from difflib import get_close_matches
from typing import Any

from fisherlora.errors import ConfigError
from fisherlora.methods.base import AdapterMethod, Method
from fisherlora.methods.compose import Composed, check_composition
from fisherlora.methods.filet import Filet
from fisherlora.methods.fim_lora import FimLoRA, RandomRank
from fisherlora.methods.fw_lora import FwLoRA
from fisherlora.methods.peers import PEERS

METHODS: dict[str, Callable[..., Method]] = {
    "fim-lora": FimLoRA,
    "random-rank": RandomRank,
    "filet": Filet,
    "fw-lora": FwLoRA,
    **PEERS,
}

# Named variants: name -> (the method it varies, the options it fixes). A fixed option wins over
# the same option given by the runner.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # FILet on W's orthonormal singular vectors instead of the paper's (non-orthogonal) gram basis
    "filet-svd": ("filet", {"basis": "svd"}),
    # FIM-LoRA scoring the squared gradient of each mini-batch loss instead of the paper's
    # per-example empirical Fisher (Eq. 1)
    "fim-lora-batch": ("fim-lora", {"estimator": "batch"}),
    # LoRA-GA as PEFT 0.21 initialises it (B₀ carries the gradient's singular values, so it starts
    # near zero) instead of the paper's Algorithm 1
    "lora-ga-peft": ("lora-ga", {"peft_init": True}),
    # --- ablations of the papers' own choices (the claims experiments, benchmarks/claims_runs.py) ---
    # FIM-LoRA with the lowest rank floor (r_min = 1 instead of our max(1, r/2)) and the other
    # two score reductions of the paper (max, l2 instead of mean)
    "fim-lora-rmin1": ("fim-lora", {"r_min": 1}),
    "fim-lora-max": ("fim-lora", {"score": "max"}),
    "fim-lora-l2": ("fim-lora", {"score": "l2"}),
    # FILet's Table-4 ablation: the highest-energy (FILet-P) and random (FILet-R) directions
    # instead of the lowest (FILet-M), on either basis; and singular-value instead of Fisher
    # magnitudes (defined on the orthonormal svd basis only)
    "filet-max": ("filet", {"select": "max"}),
    "filet-random": ("filet", {"select": "random"}),
    "filet-svd-max": ("filet", {"basis": "svd", "select": "max"}),
    "filet-svd-random": ("filet", {"basis": "svd", "select": "random"}),
    "filet-svd-singular": ("filet", {"basis": "svd", "scale": "singular"}),
    # FW-LoRA's control: warm-up K = 0 keeps I ≡ 0, i.e. the same penalty λ Σ ‖ΔW_m‖² with no
    # Fisher weighting (uniform L2 on the updates); and its two other settings, I_m normalised
    # by the largest F (max) and the paper's weight-decay form (decay; needs --weight-decay > 0)
    "fw-lora-uniform": ("fw-lora", {"fw_warmup_steps": 0}),
    "fw-lora-max": ("fw-lora", {"fw_normalize": "max"}),
    "fw-lora-decay": ("fw-lora", {"fw_mode": "decay"}),
}

# The three methods this library implements from their papers (the rest are peers and controls).
OURS = ("fim-lora", "filet", "fw-lora")

# Methods that change the ranks per module (the report draws their rank maps).
RANK_ALLOCATING = ("fim-lora", "random-rank", "eva", "adalora")


def is_ours(name: str) -> bool:
    """Whether ``name`` runs one of our three methods: FIM-LoRA, FILet or FW-LoRA, a named
    variant of one, or a ``+`` composition of them (the ``random-rank`` control is not one)."""
    return all(base_method(part) in OURS for part in name.split("+"))


def base_method(name: str) -> str:
    """The method a named variant varies (``name`` itself for a method that is no variant)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def option_names() -> set[str]:
    """Every option some method's constructor accepts (what ``get_method`` may be given)."""
    return {p for factory in METHODS.values() for p in inspect.signature(factory).parameters}


def _check_option_names(options: Mapping[str, Any]) -> None:
    """A misspelt option would otherwise be dropped without a word and the default run."""
    known = option_names()
    unknown = sorted(set(options) - known)
    if unknown:
        hints = [
            f"{k!r} (did you mean {close[0]!r}?)"
            if (close := get_close_matches(k, known, 1))
            else repr(k)
            for k in unknown
        ]
        raise ConfigError(
            f"unknown method option(s) {', '.join(hints)}; the methods take {sorted(known)}"
        )


def _single(name: str, options: Mapping[str, Any]) -> Method:
    if name in VARIANTS:
        base, fixed = VARIANTS[name]
        method = _single(base, {**options, **fixed})
        method.name = name
        return method
    if name not in METHODS:
        raise ConfigError(
            f"unknown method {name!r}; available methods are {sorted(METHODS | VARIANTS)}, "
            "and '+' combinations of fim-lora/random-rank, filet and fw-lora"
        )
    factory = METHODS[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted})


def get_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """A fresh method object for ``name``, built from the ``options`` its constructor accepts
    (the runner passes all of its method settings; each method takes the ones it knows). An
    option no method takes (a misspelling) is refused with ``ConfigError``, not dropped.
    ``a+b+c`` composes our methods (see :mod:`fisherlora.methods.compose`)."""
    options = options or {}
    _check_option_names(options)
    parts = [p.strip() for p in name.split("+")]
    if len(parts) == 1:
        return _single(parts[0], options)
    if any(not p for p in parts):
        raise ConfigError(f"method {name!r} has an empty part")
    for part in parts:
        if part not in METHODS and part not in VARIANTS:
            _single(part, options)  # raises the unknown-method error
    members = [_single(p, options) for p in check_composition(parts, base_method)]
    return Composed(name, members)


def method_names(spec: str) -> list[str]:
    """Parse a comma-separated list of method names, checking each (and each combination)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"no method named in {spec!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a method is listed twice in {spec!r}")
    for name in names:
        get_method(name)
    return names


__all__ = [
    "METHODS",
    "RANK_ALLOCATING",
    "VARIANTS",
    "AdapterMethod",
    "Method",
    "base_method",
    "get_method",
    "method_names",
]
