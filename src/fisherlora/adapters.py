"""Helpers around PEFT's LoRA layers: target resolution, finding and resizing adapters.

Notation: a target layer computes ``y = W x + s · B A x`` with ``W ∈ R^{m×n}``, ``A ∈ R^{r×n}``
(``lora_A``), ``B ∈ R^{m×r}`` (``lora_B``) and ``s = α/r`` (``α/√r`` with rsLoRA).
"""

from __future__ import annotations

import copy
import math
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
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


def lora_layers(model: nn.Module) -> tuple[str, dict[str, LoraLayer]]:
    """The adapter name and the LoRA layers of a PeftModel with exactly one LoRA adapter.

    Layer names are relative to the wrapped transformers model (``bert.encoder.layer.0...``),
    which is how PEFT matches ``rank_pattern`` / ``alpha_pattern`` keys.
    """
    if not isinstance(model, PeftModel):
        raise ConfigError(
            f"expected a peft.PeftModel with a LoRA adapter, got {type(model).__name__}"
        )
    adapters = list(model.peft_config)
    if len(adapters) != 1 or model.peft_config[adapters[0]].peft_type.value != "LORA":
        kinds = {a: model.peft_config[a].peft_type.value for a in adapters}
        raise ConfigError(f"expected exactly one LoRA adapter, the model has {kinds}")
    adapter = adapters[0]
    layers = {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }
    if not layers:
        raise ConfigError("the model has no LoRA layers (no target module was adapted)")
    unsupported = [n for n, m in layers.items() if not isinstance(m.get_base_layer(), nn.Linear)]
    if unsupported:
        raise ConfigError(
            f"only LoRA on nn.Linear layers is supported; unsupported layers: {unsupported[:5]}"
        )
    return adapter, layers


def resize_lora_layer(
    layer: LoraLayer, adapter: str, rank: int, alpha: float, *, gaussian: bool = False
) -> None:
    """Give ``layer`` rank ``rank`` and ``lora_alpha`` ``alpha``, in place.

    The first ``min(r, rank)`` rows of A and columns of B are kept; new rows of A are drawn as
    PEFT draws A (Kaiming-uniform, or N(0, 1/rank²) for ``init_lora_weights="gaussian"``) and B
    is extended with zeros, so ``B A`` is unchanged when growing (and when B = 0). The scaling is
    recomputed exactly as PEFT computes it when it loads the adapter.
    """
    old_a, old_b = layer.lora_A[adapter], layer.lora_B[adapter]
    keep = min(layer.r[adapter], rank)
    weight = old_a.weight
    new_a = nn.Linear(old_a.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    new_b = nn.Linear(
        rank,
        old_b.out_features,
        bias=old_b.bias is not None,
        device=weight.device,
        dtype=old_b.weight.dtype,
    )
    with torch.no_grad():
        if gaussian:
            nn.init.normal_(new_a.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(new_a.weight, a=math.sqrt(5))
        new_a.weight[:keep] = old_a.weight[:keep]
        new_b.weight.zero_()
        new_b.weight[:, :keep] = old_b.weight[:, :keep]
        if old_b.bias is not None:
            new_b.bias.copy_(old_b.bias)
    new_a.weight.requires_grad_(old_a.weight.requires_grad)
    new_b.requires_grad_(old_b.weight.requires_grad)
    new_a.train(old_a.training)
    new_b.train(old_b.training)
    layer.lora_A[adapter] = new_a
    layer.lora_B[adapter] = new_b
    layer.r[adapter] = rank
    layer.lora_alpha[adapter] = alpha
    use_rslora = layer.use_rslora.get(adapter, False)
    layer.scaling[adapter] = alpha / math.sqrt(rank) if use_rslora else alpha / rank


def apply_ranks(
    model: PeftModel, ranks: Mapping[str, int], *, keep_scaling: bool = True
) -> dict[str, float]:
    """Resize every LoRA layer to ``ranks[name]`` and record ``rank_pattern`` / ``alpha_pattern``.

    ``keep_scaling``: each module keeps the scaling ``s`` it had at the base rank, i.e.
    ``α_m = s · r_m`` (``s · √r_m`` with rsLoRA); otherwise ``α_m = α`` and ``s_m = α / r_m``.
    The pattern keys are the full module names, checked to resolve, under PEFT's matching, to
    exactly their own module. Returns the per-module ``α_m``.
    """
    adapter, layers = lora_layers(model)
    if set(ranks) != set(layers):
        raise ConfigError(
            f"ranks must name every LoRA layer: missing {sorted(set(layers) - set(ranks))[:5]}, "
            f"unknown {sorted(set(ranks) - set(layers))[:5]}"
        )
    check_pattern_keys(list(layers))
    config = model.peft_config[adapter]
    alphas = {}
    for name, layer in layers.items():
        rank = int(ranks[name])
        if keep_scaling:
            s = layer.scaling[adapter]
            alphas[name] = s * (math.sqrt(rank) if config.use_rslora else rank)
        else:
            alphas[name] = float(config.lora_alpha)
    gaussian = str(config.init_lora_weights).lower() == "gaussian"
    for name, layer in layers.items():
        resize_lora_layer(layer, adapter, int(ranks[name]), alphas[name], gaussian=gaussian)
    config.rank_pattern = {name: int(ranks[name]) for name in layers}
    config.alpha_pattern = dict(alphas)
    return alphas


def check_pattern_keys(names: Sequence[str]) -> None:
    """Every name, used as a PEFT pattern key, must match its own module and no other."""
    for key in names:
        hits = [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
        if hits != [key]:
            raise ConfigError(
                f"module name {key!r} is ambiguous as a PEFT pattern key: it matches {hits}"
            )


@dataclass(frozen=True)
class ResidualInit:
    """A layer whose base weight was replaced by ``W_res = W − s B₀ A₀`` at initialisation."""

    a0: torch.Tensor  # [r, n]
    b0: torch.Tensor  # [m, r]


# Models whose base weights an initialisation changed: model -> {module name: ResidualInit}.
# Weak keys, so the record dies with the model and nothing is attached to the model itself.
_RESIDUALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_residual(model: PeftModel, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Remember ``A₀``, ``B₀`` of ``name`` so that :func:`export_lora` can undo the residual."""
    _RESIDUALS.setdefault(model, {})[name] = ResidualInit(a0.detach().clone(), b0.detach().clone())


def has_residual(model: PeftModel) -> bool:
    """Whether a residual init (FILet) already replaced some base weight ``W`` by ``W_res``."""
    return bool(_RESIDUALS.get(model))


def export_lora(model: PeftModel, out_dir: str | Path) -> None:
    """Write a stock PEFT LoRA adapter that applies to the ORIGINAL base weights.

    Where an initialisation replaced ``W`` by ``W_res = W − s B₀ A₀`` (FILet, like PiSSA), the
    trained layer computes ``W_res + s B A = W + s [B, −B₀] [A; A₀]``: the adapter is written at
    rank ``2 r`` with those factors and ``α`` chosen so that PEFT's scaling is still ``s``, and
    loading it with ``PeftModel.from_pretrained`` on the untouched base model reproduces the
    trained model. Without such layers this is ``model.save_pretrained(out_dir)``.
    """
    residuals = _RESIDUALS.get(model)
    if not residuals:
        model.save_pretrained(str(out_dir))
        return
    adapter, layers = lora_layers(model)
    config = copy.deepcopy(model.peft_config[adapter])
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    rank_pattern = {name: layer.r[adapter] for name, layer in layers.items()}
    alpha_pattern = {name: float(layer.lora_alpha[adapter]) for name, layer in layers.items()}
    for name, init in residuals.items():
        layer = layers[name]
        prefix = f"base_model.model.{name}"
        a, b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
        state[f"{prefix}.lora_A.weight"] = torch.cat([a, init.a0.to(a)], dim=0).contiguous()
        state[f"{prefix}.lora_B.weight"] = torch.cat([b, -init.b0.to(b)], dim=1).contiguous()
        rank = 2 * layer.r[adapter]
        scaling = layer.scaling[adapter]
        rank_pattern[name] = rank
        alpha_pattern[name] = scaling * (math.sqrt(rank) if config.use_rslora else rank)
    check_pattern_keys(list(layers))
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    config.init_lora_weights = True  # the saved factors are complete; loading must not re-init
    config.inference_mode = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
