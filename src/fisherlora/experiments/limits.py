"""Limits of a loaded model that a run's settings must respect, checked before any work is done.

A model with learned absolute position embeddings (BERT, MiniLM, RoBERTa, MPNet, GPT-2, ...)
has one embedding row per position: a sequence longer than that fails deep inside the forward
pass (a size mismatch in BERT, an index error in MPNet), after the run has already written its
``config.json``. Rotary and relative position schemes (Llama, ...) have no such table and run on
longer inputs, so they have no limit here.
"""

from __future__ import annotations

from torch import nn

from fisherlora.errors import ConfigError

# Names that transformers gives learned absolute position-embedding tables.
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The most tokens per sequence ``model`` can read, or ``None`` where it has no learned
    absolute position table.

    RoBERTa-like tables (RoBERTa, MPNet, ...) number positions from ``padding_idx + 1``, so they
    hold ``num_embeddings - padding_idx - 1`` usable positions (514 rows, 512 tokens). Where the
    config states ``max_position_embeddings`` the smaller of the two counts (OPT's table carries
    an offset of 2 that its ``padding_idx`` does not show)."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            offset = 0 if module.padding_idx is None else module.padding_idx + 1
            limits.append(module.num_embeddings - offset)
    if not limits:
        return None
    stated = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(limits + ([stated] if isinstance(stated, int) and stated > 0 else []))


def check_max_length(model: nn.Module, max_length: int, model_name: str = "the model") -> None:
    """Raise :class:`ConfigError` when ``max_length`` tokens per text exceed
    :func:`position_limit` of ``model``, naming the limit."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"max_length {max_length} is above what model {model_name!r} can read: its position "
            f"embeddings cover {limit} tokens; use max_length <= {limit}"
        )
