"""Shared fixtures: a learnable toy task and tiny random models built from configs."""

from __future__ import annotations

import random

import pytest

from fisherlora.experiments.tasks import Task

POSITIVE = ["good", "great", "excellent", "wonderful", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor"]
FILLER = ["the", "movie", "was", "plot", "and", "actors", "story", "film", "it", "a"]


def keyword_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Sentences whose label is decided by one sentiment word hidden among filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    while len(texts) < n:
        label = rng.randrange(2)
        words = [*rng.sample(FILLER, 6), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        text = " ".join(words)
        if text not in texts:
            texts.append(text)
            labels.append(label)
    return texts, labels


@pytest.fixture(scope="session")
def keyword_task() -> Task:
    train_texts, train_labels = keyword_texts(512, seed=0)
    test_texts, test_labels = keyword_texts(128, seed=1)
    return Task(
        "keywords", train_texts, train_labels, test_texts, test_labels, ["negative", "positive"]
    )
