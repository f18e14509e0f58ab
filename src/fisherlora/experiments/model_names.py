"""The registry names of the sequence classifiers, in a module that imports nothing.

``models.py`` (the classifiers) imports ``causal_models.py`` (the tiny Llama's config, the causal
registry for its "that is a causal LM" error); ``causal_models.py`` needs only the classifiers'
*names*, for its "that is a sequence classifier" error, and takes them from here, so the two
modules do not import each other. ``tests/test_layers.py`` checks that these are exactly the keys
of ``models.MODEL_REGISTRY``.
"""

from __future__ import annotations

CLASSIFIER_NAMES = ("minilm", "tiny-bert", "tiny-llama")
# the image classifiers (``image_models.IMAGE_REGISTRY``), for the "that is an image model" errors
IMAGE_MODEL_NAMES = ("tiny-vit",)
