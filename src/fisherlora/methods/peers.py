"""The methods we compare against, through PEFT's own implementations (PEFT 0.21), except
LoRA-GA: PEFT's ``lora_ga`` init departs from the paper (see :class:`LoRAGA`), so ``lora-ga``
is written here from the paper's Algorithm 1 and PEFT's runs as the named variant
``lora-ga-peft``.

Every peer gets the same ``LoraConfig`` as our methods (rank r, α, targets, dropout) and the same
calibration data (the first ``calib_batches`` training batches, in the calibration order), so a
comparison differs only in the method. Where PEFT 0.21.2 cannot run a peer on our models as is,
the harness adapts the *data it is fed*, never what the peer computes; each workaround is written
next to the peer and listed in :data:`WORKAROUNDS`, which the comparison report prints.

Peers that replace the base weight by a residual (PiSSA, LoRA-GA, CorDA: ``W_res = W − s B₀ A₀``)
have their initial factors recorded, so :func:`~fisherlora.adapters.export_lora` writes a stock
adapter that applies to the ORIGINAL base model, exactly as it does for FILet.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    EvaConfig,
    LoraConfig,
    LoraGAConfig,
    PeftModel,
    get_peft_model,
    initialize_lora_eva_weights,
)
from peft.tuners.lora.config import CordaConfig  # not exported at the top level in PEFT 0.21
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from transformers import PreTrainedModel

from fisherlora.adapters import lora_layers, parameter_owners, record_residual
from fisherlora.capture import calibration_mode, first_batches, predicts_next_token
from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.logit_window import scored_window
from fisherlora.methods.base import AdapterMethod

Batches = Iterable[dict[str, torch.Tensor]]

# What the harness does differently from a plain call of the peer, by method (for the report).
WORKAROUNDS: dict[str, str] = {
    "eva": (
        "EVA's batches drop class-id labels (one label per sequence: its label mask does not "
        "broadcast with them); token labels of a causal LM stay, so PEFT's default label mask "
        "leaves out the prompt's tokens. A layer-input function keeps 2-D inputs (BERT's pooler "
        "sees one row per sequence) as they are instead of indexing them as [sequence, token]; "
        "consecutive batches are merged where one holds fewer than r x rho sequences. EVA's "
        "incremental SVD and rank redistribution are unchanged."
    ),
    "corda": (
        "CorDA's covariance hook assumes one sequence per forward pass (squeeze(0)), so the "
        "harness runs the calibration sentences one at a time without padding, as CorDA's own "
        "examples do. A 2-D input (BERT's pooler, [1, hidden]) is given a token axis during the "
        "covariance pass so squeeze(0) leaves [1, hidden] and the covariance is x^T x, as for "
        "every other layer. CorDA's decomposition is unchanged."
    ),
    "adalora": (
        "AdaLoRA starts at ceil(1.5 r) ranks per module and prunes to a final budget of r per "
        "module on average (target_r = r), with tinit = 10 % and tfinal = 20 % of the steps and "
        "a reallocation every 1 % of the steps; update_and_allocate runs after every optimizer "
        "step, before the gradients are zeroed. The orthogonality penalty keeps PEFT's default "
        "weight 0.5 (the AdaLoRA authors' scripts use 0.1); the scaling is alpha / init_r (PEFT's "
        "AdaLoRA), and rsLoRA, rank_pattern and alpha_pattern do not apply to it."
    ),
}


def _with(lora_config: LoraConfig, **changes: Any) -> LoraConfig:
    """A fresh copy of ``lora_config`` with ``changes`` applied (``__post_init__`` runs again)."""
    return dataclasses.replace(copy.deepcopy(lora_config), **changes)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _first_batches(
    loader: Batches | None, n: int, method: str, *, labels: bool = False, next_token: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Up to ``n`` batches of ``loader``, each checked to be a mapping of tensors (with
    ``labels`` where the peer computes the loss), before the peer changes anything."""
    if loader is None:
        raise CalibrationError(f"{method} needs calibration data; none was given")
    try:
        return first_batches(loader, n, labels=labels, next_token=next_token)
    except CalibrationError as err:
        raise CalibrationError(f"{method}: {err}") from err


def _record_initial_factors(model: PeftModel) -> None:
    """Remember every layer's ``A₀``, ``B₀`` so that the export undoes ``W_res = W − s B₀ A₀``."""
    adapter, layers = lora_layers(model)
    for name, layer in layers.items():
        record_residual(model, name, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)


class CalibratedPeer(AdapterMethod):
    """A peer that reads the first ``calib_batches`` calibration batches (EVA reads on until it
    converges), the same batches our methods calibrate on. PEFT's calibration does not
    all-reduce, so under torch.distributed every process reads all of them (and computes the
    same initialisation)."""

    shards_calibration = False

    def __init__(self, calib_batches: int = 8) -> None:
        self.calib_batches = calib_batches


class LoRA(AdapterMethod):
    """Standard LoRA (Hu et al., 2021): ``h = W x + s · B A x``, ``s = α / r`` (``α / √r`` with
    rsLoRA), A Kaiming-uniform, B = 0, so the model starts as the base model."""

    name = "lora"


class DoRA(AdapterMethod):
    """DoRA (Liu et al., 2024), PEFT ``use_dora=True``: ``h = m ⊙ (W + s B A) x / ‖W + s B A‖_c``
    with a trainable magnitude vector ``m`` (one value per output feature, initialised to the
    column norms of W), so it trains ``out_features`` more parameters per module than LoRA."""

    name = "dora"

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Batches | None = None,
    ) -> PeftModel:
        return get_peft_model(base_model, _with(lora_config, use_dora=True))


class PiSSA(AdapterMethod):
    """PiSSA (Meng et al., 2024), PEFT ``init_lora_weights="pissa"`` (full SVD): with
    ``W = U S Vᵀ``, ``B₀ = U_r S_r^½ / √s``, ``A₀ = S_r^½ V_rᵀ / √s`` and ``W_res = W − s B₀ A₀``,
    so the adapter starts in W's principal subspace and the outputs are unchanged."""

    name = "pissa"

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Batches | None = None,
    ) -> PeftModel:
        _targeted_linears(base_model, lora_config)  # a tied weight is refused before any change
        model = get_peft_model(base_model, _with(lora_config, init_lora_weights="pissa"))
        _record_initial_factors(model)
        return model


def _eva_layer_inputs(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """EVA's ``prepare_layer_inputs_fn``: PEFT's language-modelling rule, plus 2-D inputs.

    3-D inputs ``[batch, seq, hidden]`` keep the non-padding token rows, as PEFT's default does
    (``model_input`` is the ``nonzero()`` of the attention mask), or all rows where there is no
    mask (``model_input`` None: an image model's patches). A 2-D input (BERT's pooler sees
    ``hidden[:, 0]``) is used as is; its slice is non-contiguous, which EVA's input hashing
    (``view(-1)``) rejects, hence the copy.
    """
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.ndim == 2:
        return x.contiguous()
    if model_input is None:
        return x.reshape(-1, x.shape[-1])
    return x[model_input.T.unbind()]


def _eva_model_inputs(model_input: dict[str, torch.Tensor], peft_config: LoraConfig) -> Any:
    """EVA's ``prepare_model_inputs_fn``: PEFT's language-modelling rule (the indices of the
    unmasked tokens) for token batches; None (every row counts) for batches without tokens."""
    if "input_ids" not in model_input and "attention_mask" not in model_input:
        return None
    return prepare_model_inputs_fn_language_modeling(model_input, peft_config)


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return next(iter(batch.values())).shape[0]


def _pad_cat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-padded batches concatenated along the batch axis (2-D tensors zero-padded)."""
    if "input_ids" not in batches[0]:  # images: nothing to pad
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    longest = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, longest - t.shape[1]), value=value)

    # token labels are padded with the ignore index, which EVA's label mask leaves out
    return {
        k: torch.cat(
            [pad(b[k], -100 if k == "labels" else 0) if b[k].ndim == 2 else b[k] for b in batches]
        )
        for k in batches[0]
    }


def eva_batches(batches: Batches, min_rows: int) -> list[dict[str, torch.Tensor]]:
    """Drop class-id ``labels`` (``[batch]``; token labels ``[batch, seq]`` stay for EVA's label
    mask) and merge consecutive batches until each holds ``>= min_rows`` sequences.

    A layer whose input has fewer rows than its ``r · ρ`` components skips the step; the pooler
    (one row per sequence) would then never converge and EVA would loop for ever. The merge only
    regroups rows (added padding is masked out)."""
    chunks: list[list[dict[str, torch.Tensor]]] = []
    current: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        current.append({k: v for k, v in batch.items() if k != "labels" or v.ndim > 1})
        if sum(_rows(b) for b in current) >= min_rows:
            chunks.append(current)
            current = []
    if current:
        if not chunks:
            raise CalibrationError(f"EVA needs at least {min_rows} calibration sequences (r · ρ)")
        chunks[-1].extend(current)
    return [_pad_cat(c) for c in chunks]


def _some_layer_sees_2d_inputs(model: PeftModel, batch: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA layer gets a 2-D input ``[sequences, features]`` (one forward pass of
    ``batch`` without gradients, in the model's current mode)."""
    seen: list[bool] = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].ndim == 2))
        for layer in lora_layers(model)[1].values()
    ]
    device = _device_of(model)
    try:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return any(seen)


EVA_ENDLESS_BATCHES = 1024


def _eva_batch_count(loader: Batches | None) -> int:
    """How many batches EVA reads: all of a loader with a length (one epoch), else the first
    ``EVA_ENDLESS_BATCHES`` (a generator or an endless stream would otherwise be read for ever;
    PEFT cycles over the list it gets until the SVDs converge)."""
    try:
        return max(1, len(loader))  # type: ignore[arg-type]
    except TypeError:  # no length: a generator, an IterableDataset's loader
        return EVA_ENDLESS_BATCHES


class EVA(CalibratedPeer):
    """EVA (Paischer et al., 2024), PEFT ``initialize_lora_eva_weights`` with the default
    ``EvaConfig`` (ρ = 2, τ = 0.99): ``A₀`` = the top right-singular vectors of each layer's
    input activations (incremental SVD over calibration batches until they converge), ranks
    redistributed across layers by explained variance (total unchanged), ``B₀ = 0``."""

    name = "eva"

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Batches | None = None,
    ) -> PeftModel:
        config = _with(
            lora_config, init_lora_weights="eva", eva_config=lora_config.eva_config or EvaConfig()
        )
        return get_peft_model(base_model, config)

    def prepare(self, model: PeftModel, calibration_loader: Batches) -> dict[str, Any]:
        config = model.peft_config[model.active_adapter]
        # EVA cycles over its loader until every layer's SVD converges; it gets the whole
        # calibration order (one epoch of training data) and stops early.
        device = _device_of(model)
        batches = _first_batches(calibration_loader, _eva_batch_count(calibration_loader), "eva")
        # a layer whose input rows are sequences (BERT's pooler) needs r · ρ of them per batch;
        # where every input has a token axis, a batch's token rows are plenty
        min_rows = (
            math.ceil(max([config.r, *config.rank_pattern.values()]) * config.eva_config.rho)
            if _some_layer_sees_2d_inputs(model, batches[0])
            else 1
        )
        loader = [{k: v.to(device) for k, v in b.items()} for b in eva_batches(batches, min_rows)]
        initialize_lora_eva_weights(
            model,
            dataloader=loader,
            prepare_model_inputs_fn=_eva_model_inputs,
            prepare_layer_inputs_fn=_eva_layer_inputs,
            # every process reads all the calibration batches (shards_calibration = False):
            # gathering them would give each SVD world_size copies of the same rows
            gather_distributed_inputs=False,
            show_progress_bar=False,
        )
        ranks = {n: layer.r[model.active_adapter] for n, layer in lora_layers(model)[1].items()}
        return {"eva_ranks": ranks}


# LoRA-GA's "stable" scale: A₀ and B₀ are multiplied by m^¼ / √γ (the paper's and PEFT's γ)
LORAGA_GAMMA = 16


def _targeted_linears(
    base_model: torch.nn.Module, config: LoraConfig
) -> dict[str, torch.nn.Linear]:
    """The modules ``get_peft_model`` will adapt, by PEFT's own matching (a suffix list, a regex,
    ``layers_to_transform``, the model type's default targets when ``target_modules`` is None),
    found before anything changes. Raises ``ConfigError`` when none matches or a match is not an
    ``nn.Linear``."""
    if config.target_modules is None:  # PEFT infers the targets from the model type
        model_type = LoraModel.get_model_config(base_model).get("model_type")
        inferred = LoraModel.target_module_mapping.get(model_type)
        if inferred is None:
            raise ConfigError(
                f"give target_modules: PEFT has no default targets for {model_type!r}"
            )
        config = _with(config, target_modules=inferred)
    matched = {}
    for name, module in base_model.named_modules():
        found = check_target_module_exists(config, name) if name else False
        if found is True or isinstance(found, re.Match):
            matched[name] = module
    if not matched:
        raise ConfigError(f"target_modules {config.target_modules!r} match no module of the model")
    other = [
        f"{n} ({type(m).__name__})"
        for n, m in matched.items()
        if not isinstance(m, torch.nn.Linear)
    ]
    if other:
        raise ConfigError(f"only nn.Linear layers can be adapted here, got {', '.join(other)}")
    _refuse_tied_weights(base_model, matched)
    return matched


def _refuse_tied_weights(base_model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """A residual init writes ``W − s B₀ A₀`` into the weight: where that Parameter is shared
    (a causal LM's ``lm_head`` tied to its embeddings) the other module would change too and the
    outputs with it. Raises ``ConfigError`` naming both modules."""
    owners = parameter_owners(base_model)
    for name, module in layers.items():
        shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ConfigError(
                f"{name}'s weight is tied to {', '.join(shared)}; a residual init (W − s B₀A₀) "
                "would change both: leave it out of the targets"
            )


def mean_weight_gradients(
    base_model: torch.nn.Module, layers: dict[str, torch.nn.Linear], batches: list[dict]
) -> dict[str, torch.Tensor]:
    """``G = (1/T) Σ_t ∂L_t/∂W`` of every layer in ``layers`` over the ``T`` batches (float32),
    in training mode as LoRA-GA's authors estimate it (dropout on), with gradients on those
    weights only. Whatever happens, the model's ``requires_grad`` flags and train/eval modes are
    as before and every ``.grad`` is cleared (``calibration_mode``). Raises ``CalibrationError``
    for a layer the loss does not reach and for a non-finite gradient."""
    device = _device_of(base_model)
    sums: dict[str, torch.Tensor] = {}
    with calibration_mode(base_model, [m.weight for m in layers.values()], dropout=True):
        for batch in batches:
            on_device = {k: v.to(device) for k, v in batch.items()}
            base_model(**scored_window(base_model, on_device)).loss.backward()
        for name, module in layers.items():
            if module.weight.grad is None:
                raise CalibrationError(f"lora-ga: the loss does not depend on {name}")
            sums[name] = module.weight.grad.detach().float() / len(batches)
    bad = [name for name, g in sums.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise CalibrationError(
            f"lora-ga: the calibration gradient of {bad[0]} is not finite (NaN or inf); "
            "check the calibration data and the model's precision"
        )
    return sums


class LoRAGA(CalibratedPeer):
    """LoRA-GA (Wang et al., 2024), the paper's Algorithm 1 with its "stable" scale: with the
    mean full-weight gradient ``G = U S Vᵀ`` of each targeted ``W ∈ R^{m×n}`` over the
    calibration batches,

        ``A₀ = ζ V[:, :r]ᵀ``,  ``B₀ = ζ U[:, r:2r]``,  ``ζ = m^¼ / √γ`` (γ = 16),
        ``W_res = W − s B₀ A₀``,

    so the first step of ``s B A`` moves along G's top 2r singular directions
    (``Δ(BA) ∝ B₀B₀ᵀG + G A₀ᵀA₀``), approximating full fine-tuning's first step, and the outputs
    are unchanged at init. No singular values enter the factors (as in the authors' code, whose
    "stable" scale multiplies both factors by ζ).

    ``peft_init=True`` (the named variant ``lora-ga-peft``) runs PEFT 0.21's ``lora_ga`` init on
    the same gradients instead, which multiplies B₀ by ``S[r:2r]`` and only B₀ by ζ: B₀ starts
    near zero (the gradient's singular values are small), so the init is close to "A from the
    gradient, B = 0".
    """

    name = "lora-ga"

    def __init__(self, calib_batches: int = 8, peft_init: bool = False) -> None:
        super().__init__(calib_batches)
        self.peft_init = peft_init

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Batches | None = None,
    ) -> PeftModel:
        ga = lora_config.lora_ga_config
        if (
            not self.peft_init
            and ga is not None
            and (ga.direction, ga.scale) != ("ArB2r", "stable")
        ):
            raise ConfigError(
                f"lora-ga runs the paper's init (direction ArB2r, scale stable), got direction "
                f"{ga.direction!r}, scale {ga.scale!r}; PEFT's other options run as lora-ga-peft"
            )
        gamma = ga.stable_gamma if ga is not None else LORAGA_GAMMA
        batches = _first_batches(
            calibration_loader,
            self.calib_batches,
            "lora-ga",
            labels=True,
            next_token=predicts_next_token(base_model),
        )
        layers = _targeted_linears(base_model, lora_config)
        ranks = {name: _layer_rank(lora_config, name) for name in layers}
        too_wide = [
            f"{n} (r = {ranks[n]}, width {min(m.weight.shape)})"
            for n, m in layers.items()
            if 2 * ranks[n] > min(m.weight.shape)
        ]
        if too_wide:
            raise ConfigError(
                "lora-ga takes 2r singular directions of each layer's gradient; these layers "
                f"have fewer: {', '.join(too_wide)}"
            )
        grads = mean_weight_gradients(base_model, layers, batches)
        if self.peft_init:  # PEFT's own lora_ga_init reads (and deletes) the attached gradient
            for name, module in layers.items():
                module._peft_loraga_grad = grads[name]
            config = _with(
                lora_config, init_lora_weights="lora_ga", lora_ga_config=ga or LoraGAConfig()
            )
            try:
                model = get_peft_model(base_model, config)
            finally:
                for module in layers.values():
                    if hasattr(module, "_peft_loraga_grad"):
                        del module._peft_loraga_grad
        else:
            # every factor before the model changes: nothing below can fail half-way
            factors = {n: paper_factors(grads[n], ranks[n], gamma) for n in layers}
            model = get_peft_model(base_model, _with(lora_config, init_lora_weights=True))
            adapter, lora = lora_layers(model)
            for name, layer in lora.items():
                _set_residual_init(layer, adapter, *factors[name])
        _record_initial_factors(model)
        return model


def _layer_rank(config: LoraConfig, name: str) -> int:
    """The rank PEFT gives module ``name`` (``rank_pattern`` by PEFT's own key matching)."""
    key = get_pattern_key(config.rank_pattern.keys(), name)
    return int(config.rank_pattern.get(key, config.r))


def paper_factors(
    grad: torch.Tensor, r: int, gamma: float = LORAGA_GAMMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's ``A₀ = ζ V[:, :r]ᵀ`` ``[r, n]`` and ``B₀ = ζ U[:, r:2r]`` ``[m, r]`` from the
    gradient ``G = U S Vᵀ`` ``[m, n]``, ``ζ = m^¼ / √γ`` (exact SVD, float32)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    zeta = grad.shape[0] ** 0.25 / math.sqrt(gamma)
    return zeta * vh[:r], zeta * u[:, r : 2 * r]


@torch.no_grad()
def _set_residual_init(layer: Any, adapter: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """``A ← A₀``, ``B ← B₀``, ``W ← W − s B₀ A₀`` (float32 arithmetic, on the layer's device)."""
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_a.copy_(a0.to(lora_a.device, lora_a.dtype))
    lora_b.copy_(b0.to(lora_b.device, lora_b.dtype))
    weight = layer.get_base_layer().weight
    offset = layer.scaling[adapter] * (lora_b.float() @ lora_a.float())
    weight.copy_((weight.float() - offset).to(weight.dtype))


def _token_axis_for_2d_inputs(layers: Iterable[torch.nn.Linear]) -> list:
    """Hooks that give 2-D inputs of target linears a token axis ([n, d] → [n, 1, d]) and take
    it off the output again, so CorDA's ``squeeze(0)`` leaves a 2-D matrix (see WORKAROUNDS)."""
    handles = []
    widened: set[int] = set()  # modules whose current call got the extra axis

    def add_axis(module, args):
        if args[0].ndim != 2:
            return None
        widened.add(id(module))
        return (args[0].unsqueeze(1), *args[1:])

    def drop_axis(module, args, output):
        if id(module) not in widened:
            return None
        widened.discard(id(module))
        return output.squeeze(1)

    for module in layers:
        handles.append(module.register_forward_pre_hook(add_axis))
        handles.append(module.register_forward_hook(drop_axis))
    return handles


@contextmanager
def _undone_on_failure(
    model: torch.nn.Module, modules: Iterable[torch.nn.Module]
) -> Iterator[None]:
    """On an exception inside, take off what a PEFT preprocessing step left on ``modules`` (the
    forward hooks and attributes it added: CorDA's ``covariance_matrix``, ``sample_count``,
    ``eigens``, ...) and restore the model's train/eval modes, then re-raise: PEFT removes them
    only on success."""
    modes = {m: m.training for m in model.modules()}
    modules = list(modules)
    hooks = {m: set(m._forward_hooks) for m in modules}
    attributes = {m: set(vars(m)) for m in modules}
    try:
        yield
    except BaseException:
        for m in modules:
            for key in set(m._forward_hooks) - hooks[m]:
                m._forward_hooks.pop(key)
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
            for name in set(vars(m)) - attributes[m]:
                delattr(m, name)
        for m, training in modes.items():
            m.training = training
        raise


class CorDA(CalibratedPeer):
    """CorDA (Yang et al., 2024), PEFT ``preprocess_corda`` in its instruction-previewed mode
    (``corda_method="ipm"``): with the input covariance ``C = Σ XᵀX`` of each layer over the
    calibration sentences, ``W C = U S Vᵀ``; the adapter takes the top-r components,
    ``B₀ A₀ = U_r S_r (V_rᵀ C⁻¹)`` (split by ``S_r^½``) and ``W_res = W − s B₀ A₀``."""

    name = "corda"

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Batches | None = None,
    ) -> PeftModel:
        batches = _first_batches(calibration_loader, self.calib_batches, "corda")
        # checked here: PEFT's covariance hooks would stay on the model if run_model failed
        unmasked = [
            i for i, b in enumerate(batches) if "input_ids" in b and "attention_mask" not in b
        ]
        if unmasked:
            raise CalibrationError(
                f"corda: calibration batch {unmasked[0]} has no 'attention_mask'; CorDA runs "
                "each sentence without its padding, which the mask marks"
            )
        config = _with(
            lora_config,
            init_lora_weights="corda",
            corda_config=lora_config.corda_config or CordaConfig(corda_method="ipm"),
        )
        device = _device_of(base_model)

        @torch.no_grad()
        def run_model() -> None:
            for batch in batches:
                if "input_ids" not in batch:  # images: one example at a time, as sentences are
                    for pixels in batch["pixel_values"]:
                        base_model(pixel_values=pixels[None].to(device))
                    continue
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    keep = mask.bool()
                    base_model(
                        input_ids=ids[keep][None].to(device),
                        attention_mask=mask[keep][None].to(device),
                    )

        layers = list(_targeted_linears(base_model, config).values())
        handles = _token_axis_for_2d_inputs(layers)
        try:
            with _undone_on_failure(base_model, layers):
                preprocess_corda(base_model, config, run_model=run_model)
        finally:
            for handle in handles:
                handle.remove()
        model = get_peft_model(base_model, config)
        _record_initial_factors(model)
        return model


class AdaLoRA(AdapterMethod):
    """AdaLoRA (Zhang et al., 2023), PEFT ``AdaLoraConfig``: ``ΔW = P Λ Q`` (SVD form), pruned
    by the sensitivity ``|w · ∂L/∂w|`` (smoothed) from ``init_r = ⌈1.5 r⌉`` per module to a total
    budget of ``r`` per module (``target_r = r``), plus the orthogonality penalty on P, Q."""

    name = "adalora"

    def __init__(self, steps: int = 300) -> None:
        self.steps = steps

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Batches | None = None,
    ) -> PeftModel:
        r = lora_config.r
        config = AdaLoraConfig(
            task_type=lora_config.task_type,
            modules_to_save=lora_config.modules_to_save,
            target_modules=lora_config.target_modules,
            lora_alpha=lora_config.lora_alpha,
            lora_dropout=lora_config.lora_dropout,
            init_r=max(r + 1, math.ceil(1.5 * r)),
            target_r=r,
            total_step=self.steps,
            tinit=self.steps // 10,
            tfinal=self.steps // 5,
            deltaT=max(1, self.steps // 100),
        )
        return get_peft_model(base_model, config)

    def after_backward(self, model: PeftModel, step: int) -> None:
        # A step an fp16 GradScaler skipped left inf/NaN gradients (clipping turns them into
        # NaN): PEFT's sensitivity averages (p · ∂L/∂p) would stay NaN for good, so such a step
        # is skipped here too, as the optimizer skipped it. One check for all of them.
        # From the final pruning on, PEFT reads no gradient (it masks to the final budget, then
        # keeps that pattern): those steps always run.
        config = model.peft_config[model.active_adapter]
        reads_gradients = step - 1 < config.total_step - config.tfinal
        if reads_gradients:  # the check (a device sync) only where PEFT reads the gradients
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            if grads and not bool(
                torch.stack([g.float().abs().sum() for g in grads]).isfinite().all()
            ):
                return
        # PEFT counts steps from 0; the gradients of this step are still in place.
        model.base_model.update_and_allocate(step - 1)


PEERS = {m.name: m for m in (LoRA, DoRA, PiSSA, EVA, LoRAGA, CorDA, AdaLoRA)}
