"""Helpers around PEFT's LoRA layers: which modules a target list reaches, and whether we support them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from fisherlora.errors import ConfigError


def target_matches(module_name: str, target: str) -> bool:
    """PEFT's rule for one entry of a ``target_modules`` list: the name or its last dotted part(s)."""
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``targets`` selects, as PEFT would select them.

    ``targets`` is a list of name suffixes (every entry must match at least one module) or a single
    regular expression matched against the full module name. Raises :class:`ConfigError` naming the
    pattern that matches nothing, or a matched module that is not an ``nn.Linear``.
    """
    named = dict(model.named_modules())
    if isinstance(targets, str):
        chosen = [name for name in named if re.fullmatch(targets, name)]
        if not chosen:
            raise ConfigError(
                f"target pattern {targets!r} matches no module; {_linear_hint(named)}"
            )
    else:
        if not targets:
            raise ConfigError("the list of target modules is empty")
        chosen = []
        for target in targets:
            hits = [name for name in named if target_matches(name, target)]
            if not hits:
                raise ConfigError(
                    f"target module {target!r} matches no module; {_linear_hint(named)}"
                )
            chosen.extend(h for h in hits if h not in chosen)
    unsupported = [
        f"{n} ({type(named[n]).__name__})" for n in chosen if not isinstance(named[n], nn.Linear)
    ]
    if unsupported:
        raise ConfigError(
            f"targets select modules that are not nn.Linear, which fisherlora does not support: "
            f"{unsupported[:5]}{' ...' if len(unsupported) > 5 else ''}"
        )
    return chosen


def _linear_hint(named: dict[str, nn.Module]) -> str:
    suffixes = sorted(
        {name.rsplit(".", 1)[-1] for name, m in named.items() if isinstance(m, nn.Linear)}
    )
    return f"the model's linear layers end in {suffixes}"
