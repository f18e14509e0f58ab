"""Only the positions that are read need a causal LM's vocabulary head.

A causal LM projects every position onto its vocabulary (49,152 words for SmolLM2), though a
classification-by-generation batch scores one token per row and its evaluation reads one
position per row. transformers' causal LMs take ``logits_to_keep = K``: the head then runs on
the last K positions only. With right padding, K is the span from the first position that is
read to the end of the batch:

- evaluation (:func:`logits_at_last_token`): K = length − min_i(last_i), each row's last real
  token being at ``last_i``;
- training (:func:`scored_window`): the label at position p is predicted by the output at
  p − 1, so K = length − f + 1 for the first scored position f of any row, and the labels are
  cut to the same window (the loss shifts them by one inside it: the label at the window's first
  position, unscored by the choice of f, is the one dropped).

The logits kept and the loss are those of the full pass (the same rows of the same matrices).
A model whose forward does not take ``logits_to_keep`` gets the full pass, as before.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

IGNORE_INDEX = -100  # the label of a position the loss skips (transformers' convention)


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model under any DDP and PEFT wrappers takes ``logits_to_keep``."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache  # asked once per training step: the signature is read once per model class
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def logits_at_last_token(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's logits at its last real token of a right-padded batch ``[rows, vocabulary]``."""
    last = batch["attention_mask"].sum(dim=1) - 1
    length = batch["input_ids"].shape[1]
    keep = {"logits_to_keep": int(length - last.min())} if keeps_logits(model) else {}
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep
    ).logits
    # logits_to_keep = K gives the outputs of the last K positions: position p is K - length + p
    return logits[torch.arange(len(last), device=logits.device), last - length + logits.shape[1]]


def scored_window(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A causal LM's training batch with ``logits_to_keep`` and its labels cut to the window
    that holds every scored label and the positions predicting them; ``batch`` itself where the
    model does not take ``logits_to_keep``, the labels are not per token, or the window is the
    whole batch."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or not keeps_logits(model):
        return batch
    scored = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(scored) == 0:
        return batch
    keep = labels.shape[1] - int(scored[0]) + 1
    if keep >= labels.shape[1]:
        return batch
    return batch | {"labels": labels[:, -keep:], "logits_to_keep": keep}
