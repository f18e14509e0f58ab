"""Helpers around PEFT's LoRA layers: target resolution, finding and resizing adapters.

Notation: a target layer computes ``y = W x + s · B A x`` with ``W ∈ R^{m×n}``, ``A ∈ R^{r×n}``
(``lora_A``), ``B ∈ R^{m×r}`` (``lora_B``) and ``s = α/r`` (``α/√r`` with rsLoRA).
"""

from __future__ import annotations

import copy
import math
import re
import types
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def resolve_targets(
    model: nn.Module, targets: str | Sequence[str], *, rank: int | None = None
) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``targets`` selects, as PEFT would select them.

    ``targets`` is a list of name suffixes (every entry must match at least one module) or a single
    regular expression matched against the full module name. Raises :class:`ConfigError` naming the
    pattern that matches nothing, or a matched module that is not an ``nn.Linear``; with ``rank``,
    also when ``rank`` exceeds what a selected layer can use (see :func:`check_rank_fits`).
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
    if rank is not None:
        check_rank_fits({name: named[name] for name in chosen}, rank)
    return chosen


def max_useful_rank(layer: nn.Module) -> int:
    """``min(in_features, out_features)`` of an ``nn.Linear`` or a PEFT ``LoraLayer``: the
    highest rank an ``m × n`` update ``B A`` can have, so a LoRA rank above it adds parameters
    (and memory) but nothing the update could express."""
    return min(layer.in_features, layer.out_features)


def check_rank_fits(layers: Mapping[str, nn.Module], rank: int, what: str = "rank") -> None:
    """Raise :class:`ConfigError` when ``rank`` exceeds :func:`max_useful_rank` of a layer
    (``nn.Linear`` or ``LoraLayer``).

    Called before any adapter exists: PEFT would otherwise allocate ``A``, ``B`` at that rank for
    every target (gigabytes for a mistyped rank) before anything failed. The message names the
    smallest layer, its shape and the largest rank every target can use.
    """
    if not layers:
        return
    name, layer = min(layers.items(), key=lambda item: max_useful_rank(item[1]))
    limit = max_useful_rank(layer)
    if rank > limit:
        raise ConfigError(
            f"{what} {rank} is above what target layer {name!r} can use: its weight is "
            f"{layer.out_features} x {layer.in_features} (out x in), so a rank above "
            f"min(out, in) = {limit} adds nothing; use {what} <= {limit}"
        )


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
    # every layer with this adapter: PEFT keeps an embedding's factors in lora_embedding_A/B,
    # not lora_A, and such a layer must be refused, not silently left out
    adapted = {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
        and (adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}))
    }
    if not adapted:
        raise ConfigError("the model has no LoRA layers (no target module was adapted)")
    unsupported = [
        f"{n} ({type(m.get_base_layer()).__name__})"
        for n, m in adapted.items()
        if adapter not in m.lora_A or not isinstance(m.get_base_layer(), nn.Linear)
    ]
    if unsupported:
        raise ConfigError(
            f"only LoRA on nn.Linear layers is supported; unsupported layers: {unsupported[:5]}"
            + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        )
    return adapter, adapted


def subspace_overlap(a_initial: torch.Tensor, a_final: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of two A matrices,
    ``‖Q₀ᵀ Q₁‖²_F / r`` with ``Q`` orthonormal bases of ``rowspace(A)`` (1: the final adapter
    still reads exactly the initial input directions; about r/n for unrelated ones)."""
    q0 = torch.linalg.qr(a_initial.detach().float().T).Q
    q1 = torch.linalg.qr(a_final.detach().float().T).Q
    return torch.linalg.svdvals(q0.T @ q1).square().mean().item()


def input_factors(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A copy of every LoRA layer's A (the directions the adapter reads), or None for a model
    without plain LoRA adapters (AdaLoRA's SVD form, no PeftModel)."""
    try:
        adapter, layers = lora_layers(model)
    except ConfigError:
        return None
    return {n: layer.lora_A[adapter].weight.detach().clone() for n, layer in layers.items()}


def row_space_kept(initial: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """Per LoRA layer, :func:`subspace_overlap` of ``initial`` A (:func:`input_factors`) and the
    model's A now: how much of the input subspace the adapter started with it still reads."""
    adapter, layers = lora_layers(model)
    return {
        n: subspace_overlap(initial[n], layer.lora_A[adapter].weight)
        for n, layer in layers.items()
        if n in initial
    }


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


@contextmanager
def adapter_sizes_restored_on_error(model: PeftModel) -> Iterator[None]:
    """Put every LoRA layer's factor modules, rank, alpha and scaling, and the adapter config's
    ``rank_pattern`` / ``alpha_pattern``, back as they were if the block raises.

    For a composition, whose later member (FILet) may refuse after the rank allocator resized
    the adapters: :func:`resize_lora_layer` replaces the factor modules rather than writing into
    them, so keeping the old modules is enough. Base weights are not kept: the initialisations
    write them only after every check has passed."""
    adapter, layers = lora_layers(model)
    config = model.peft_config[adapter]
    kept = {
        name: (
            layer.lora_A[adapter],
            layer.lora_B[adapter],
            layer.r[adapter],
            layer.lora_alpha[adapter],
            layer.scaling[adapter],
        )
        for name, layer in layers.items()
    }
    patterns = copy.deepcopy((config.rank_pattern, config.alpha_pattern))
    try:
        yield
    except BaseException:
        for name, (a, b, rank, alpha, scaling) in kept.items():
            layer = layers[name]
            layer.lora_A[adapter], layer.lora_B[adapter] = a, b
            layer.r[adapter], layer.lora_alpha[adapter] = rank, alpha
            layer.scaling[adapter] = scaling
        config.rank_pattern, config.alpha_pattern = patterns
        raise


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
# Weak keys, so the record dies with the model; the one thing attached to the model itself is
# its routed ``save_pretrained`` (see save_for_original_base).
_RESIDUALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Models whose save_pretrained writes PEFT's own adapter for now (inside raw_adapter_saves).
_RAW_SAVES: weakref.WeakSet = weakref.WeakSet()


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """The names under which each parameter (by ``id``) is reachable in ``model``: a tied
    weight (a causal LM's ``lm_head`` and its embeddings) has more than one."""
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    return owners


def record_residual(model: PeftModel, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Remember ``A₀``, ``B₀`` of ``name`` so that :func:`export_lora` can undo the residual, and
    route the model's ``save_pretrained`` through :func:`export_lora` (see
    :func:`save_for_original_base`)."""
    _RESIDUALS.setdefault(model, {})[name] = ResidualInit(a0.detach().clone(), b0.detach().clone())
    if "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(save_for_original_base, model)


def save_for_original_base(
    self: PeftModel,
    save_directory: str | Path,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: str | bool = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | None = None,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a model whose base weights a residual init replaced (FILet, and the
    harness's PiSSA, LoRA-GA and CorDA): it writes :func:`export_lora`'s adapter, which applied
    to the untouched pretrained base reproduces this model, as PEFT's
    ``path_initial_model_for_weight_conversion`` does for PiSSA. :func:`record_residual` installs
    it on the model instance; the signature is PEFT's.

    PEFT's own save would write ``A``, ``B`` alone, an adapter for ``W_res = W − s B₀ A₀``: on
    the untouched base it computes ``W + s B A``, a different model (max |Δ logit| 7.7e-3 on
    MiniLM right after FILet), without any error. That adapter is still there for what needs it
    (a checkpoint to be resumed on this very model, as the HF Trainer's): inside
    :func:`raw_adapter_saves`, or as ``PeftModel.save_pretrained(model, ...)``.

    The exported adapter is always written as safetensors, by the main process only;
    ``path_initial_model_for_weight_conversion`` is refused (the adapter is converted already).
    """
    if self in _RAW_SAVES or not has_residual(self):
        type(self).save_pretrained(
            self,
            str(save_directory),
            safe_serialization=safe_serialization,
            selected_adapters=selected_adapters,
            save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
            **kwargs,
        )
        return
    if path_initial_model_for_weight_conversion is not None:
        raise ConfigError(
            "this model's base weights are residuals of an initialisation (FILet, PiSSA, ...): "
            "its save_pretrained already writes the adapter converted for the original base "
            "weights; leave out path_initial_model_for_weight_conversion"
        )
    adapter, _ = lora_layers(self)
    if selected_adapters is not None and list(selected_adapters) != [adapter]:
        raise ConfigError(
            f"selected_adapters {selected_adapters!r}: this model has the one adapter {adapter!r}"
        )
    if is_main_process:
        export_lora(self, save_directory, state_dict=kwargs.get("state_dict"))


@contextmanager
def raw_adapter_saves(model: PeftModel) -> Iterator[None]:
    """Within the block, ``model.save_pretrained`` writes PEFT's own adapter (``A``, ``B`` for
    the residual base weights, rank r), not the export for the original base: what a checkpoint
    needs that is loaded back into this very model (``FisherTrainer``'s checkpoints)."""
    _RAW_SAVES.add(model)
    try:
        yield
    finally:
        _RAW_SAVES.discard(model)


def has_residual(model: PeftModel) -> bool:
    """Whether a residual init (FILet) already replaced some base weight ``W`` by ``W_res``."""
    return bool(_RESIDUALS.get(model))


def export_lora(
    model: PeftModel, out_dir: str | Path, *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write a stock PEFT LoRA adapter that applies to the ORIGINAL base weights.

    Where an initialisation replaced ``W`` by ``W_res = W − s B₀ A₀`` (FILet, like PiSSA), the
    trained layer computes ``W_res + s B A = W + s [B, −B₀] [A; A₀]``: the adapter is written at
    rank ``2 r`` with those factors and ``α`` chosen so that PEFT's scaling is still ``s``, and
    loading it with ``PeftModel.from_pretrained`` on the untouched base model reproduces the
    trained model. Without such layers this is PEFT's ``save_pretrained(out_dir)``.
    ``state_dict``: the model's weights to write, where they are not the model's own (as
    ``save_pretrained``'s ``state_dict``); default: the model's.

    A residual-initialised model's own ``model.save_pretrained(out_dir)`` calls this (see
    :func:`save_for_original_base`).
    """
    if not isinstance(model, PeftModel):  # a plain model would be saved whole, as a checkpoint
        raise ConfigError(
            f"export_lora writes a PEFT adapter: expected a peft.PeftModel, got "
            f"{type(model).__name__}"
        )
    residuals = _RESIDUALS.get(model)
    if not residuals:
        type(model).save_pretrained(model, str(out_dir), state_dict=state_dict)
        return
    adapter, layers = lora_layers(model)
    config = copy.deepcopy(model.peft_config[adapter])
    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter)
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
