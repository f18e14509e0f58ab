"""Image classifiers by registry name, local folder or hub name, with their image processors.

Registry names:

- ``tiny-vit``: a randomly initialised ViT (32×32 images, patches of 8, hidden size 32, two
  layers), for tests and smoke runs in seconds.

Any other name is loaded with ``AutoModelForImageClassification`` and ``AutoImageProcessor``
from a local folder or the hub (e.g. ``google/vit-base-patch32-224-in21k``, the ViT-B/32 of
FILet's image table, where a hub is reachable), with a new head of the task's classes. No ready
pretrained image classifier ships inside a package on the index this project installs from
(``docs/images.md`` says what was found), so there is no offline pretrained default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from fisherlora.errors import ConfigError
from fisherlora.experiments.hub import check_model_source
from fisherlora.experiments.model_names import CLASSIFIER_NAMES
from fisherlora.experiments.precision import as_float32, float32_load_kwargs


def tiny_vit_config(num_labels: int) -> ViTConfig:
    return ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,  # deterministic for tests
    )


def _tiny_vit(num_labels: int) -> tuple[PreTrainedModel, Any]:
    # the PIL processor where transformers has one (its default one wants torchvision)
    processor_class = getattr(transformers, "ViTImageProcessorPil", None)
    if processor_class is None:  # transformers 4.x
        processor_class = transformers.ViTImageProcessor
    processor = processor_class(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ViTForImageClassification(tiny_vit_config(num_labels)), processor


def _pretrained(name: str, num_labels: int) -> tuple[PreTrainedModel, Any]:
    processor = AutoImageProcessor.from_pretrained(name)
    model = AutoModelForImageClassification.from_pretrained(
        name,
        num_labels=num_labels,
        ignore_mismatched_sizes=True,  # a fine-tuned checkpoint's head has other classes
        **float32_load_kwargs(),
    )
    as_float32(model)
    return model, processor


IMAGE_REGISTRY: dict[str, Callable[[int], tuple[PreTrainedModel, Any]]] = {"tiny-vit": _tiny_vit}


def load_image_model(name: str, num_labels: int, *, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """``name`` (registry name, local folder or hub name) with a fresh ``num_labels`` head drawn
    from ``seed``, and its image processor."""
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialised head" report is expected
    try:
        if name in IMAGE_REGISTRY:
            return IMAGE_REGISTRY[name](num_labels)
        if name in CLASSIFIER_NAMES:
            raise ConfigError(
                f"{name!r} is a text model; an image task needs an image classifier: "
                f"--model tiny-vit, or a local folder or hub name of one"
            )
        check_model_source(name, IMAGE_REGISTRY, "image model")
        try:
            return _pretrained(name, num_labels)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"unknown image model {name!r}: not a registry name ({sorted(IMAGE_REGISTRY)}), "
                f"not a local image-classification model folder, and loading it failed: {err}"
            ) from err
    finally:
        transformers.logging.set_verbosity(verbosity)
