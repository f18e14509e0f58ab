"""The task-kind interface that ``train()`` runs on: each kind's batches and evaluation on a tiny
random model, the kind picked for each kind of data, and a run of a task that only implements
the protocol."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_batches
from transformers import BertConfig, BertForSequenceClassification

from fisherlora.errors import ConfigError
from fisherlora.experiments.generation_tasks import as_generation_task
from fisherlora.experiments.task_kinds import (
    Classification,
    ClassificationByGeneration,
    Evaluation,
    LanguageModelling,
    TaskKind,
    task_kind,
)
from fisherlora.experiments.train import TrainConfig, train

CLASS_SCORES = {"accuracy", "macro_f1", "mcc", "nll"}
# kind, its data, the tiny registry model it trains (hidden size 32), its scores
KINDS = {
    "classification": (Classification, None, "tiny-bert", CLASS_SCORES),
    "generation": (ClassificationByGeneration, "classify", "tiny-llama-lm", CLASS_SCORES),
    "lm": (LanguageModelling, "lm", "tiny-llama-lm", {"nll", "perplexity"}),
}


def small(keyword_task):
    """The keyword task cut to 80 training and 12 test examples."""
    return replace(
        keyword_task,
        train_texts=keyword_task.train_texts[:80],
        train_labels=keyword_task.train_labels[:80],
        test_texts=keyword_task.test_texts[:12],
        test_labels=keyword_task.test_labels[:12],
    )


def loaded_kind(name: str, keyword_task):
    """The kind ``name`` over the small keyword data with a validation split, its tiny model
    loaded."""
    _, generation, model_name, _ = KINDS[name]
    data = small(keyword_task)
    data = as_generation_task(data, generation) if generation else data
    kind = task_kind(data.carve_validation(0.2), TrainConfig(model=model_name, max_length=24))
    return kind, kind.load_model(model_name, seed=0)


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_of_data_gets_its_kind_and_implements_the_protocol(name, keyword_task):
    kind_class, generation, _, _ = KINDS[name]
    data = as_generation_task(keyword_task, generation) if generation else keyword_task
    kind = task_kind(data, TrainConfig(max_length=24))
    assert type(kind) is kind_class and isinstance(kind, TaskKind)
    assert kind.name == data.name and kind.class_names == data.class_names
    assert kind.sizes() == data.sizes()
    with pytest.raises(RuntimeError, match="load_model"):  # the tokenizer comes with the model
        kind.train_batches(4, seed=0)
    with pytest.raises(ConfigError, match="no kind of task"):
        task_kind(object(), TrainConfig())


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_batches_its_training_split(name, keyword_task):
    kind, model = loaded_kind(name, keyword_task)
    assert kind.peft_task_type == ("SEQ_CLS" if name == "classification" else "CAUSAL_LM")
    batches = list(kind.train_batches(8, seed=0))
    assert len(batches) == kind.sizes()["train"] // 8  # a short trailing batch is dropped
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        rows, width = batch["input_ids"].shape
        assert rows == 8 and 1 < width <= 24 and batch["attention_mask"].shape == (rows, width)
        if name == "classification":  # one class id per text
            assert batch["labels"].shape == (rows,)
        else:  # next-token labels, -100 on the prompt and the padding
            assert batch["labels"].shape == (rows, width)
            scored = batch["labels"] != -100
            assert scored.any(dim=1).all() and not (scored & (batch["attention_mask"] == 0)).any()
    assert model(**batches[0]).loss.ndim == 0  # what the loop trains on
    # seeded: the same seed the same order, another seed another
    again = list(kind.train_batches(8, seed=0))
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True)
    )
    other = list(kind.train_batches(8, seed=1))
    assert not all(
        a["input_ids"].shape == b["input_ids"].shape and torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(batches, other, strict=True)
    )
    # a share of two processes: every other batch of the one-process sequence
    share = list(kind.train_batches(8, seed=0, rank=1, world_size=2))
    assert [b["input_ids"].tolist() for b in share] == [
        b["input_ids"].tolist() for b in batches[1::2]
    ][: len(share)]


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_evaluates_a_split_with_its_scores(name, keyword_task):
    kind, model = loaded_kind(name, keyword_task)
    expected = KINDS[name][3]
    model.train()
    for split, size in (("test", 8), ("validation", kind.sizes()["validation"])):
        limit = 8 if split == "test" else None
        score = kind.evaluator(split, limit=limit, batch_size=4, device=torch.device("cpu"))
        scores, confusion = score(model)
        assert set(scores) == expected and all(np.isfinite(v) for v in scores.values())
        if name == "lm":
            assert confusion is None and scores["perplexity"] > 1
        else:  # every example scored once, into one of the two classes
            assert confusion.shape == (2, 2) and confusion.sum() == size
        assert model.training  # evaluation leaves the model in the mode it found it in
    with pytest.raises(ValueError, match="unknown split"):
        kind.evaluator("train", limit=None, batch_size=4, device=torch.device("cpu"))


def test_a_kind_without_a_validation_split_refuses_to_evaluate_one(keyword_task):
    kind = task_kind(keyword_task, TrainConfig())
    kind.load_model("tiny-bert", seed=0)
    with pytest.raises(ConfigError, match="no validation split"):
        kind.evaluator("validation", limit=None, batch_size=4, device=torch.device("cpu"))


class TokenTask:
    """A task that is nothing but the protocol: random token batches on a hidden-32 BERT, scored
    by accuracy and a score of its own."""

    name = "random-tokens"
    peft_task_type = "SEQ_CLS"

    def __init__(self) -> None:
        self.class_names = ["zero", "one"]
        self.evaluated: list[str] = []

    def sizes(self) -> dict[str, int]:
        return {"train": 64, "test": 16}

    def load_model(self, name: str, *, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
        )
        return BertForSequenceClassification(config)

    def train_batches(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        return random_batches(64 // batch_size, batch_size=batch_size, seed=seed)

    def evaluator(self, split, *, limit, batch_size, device, rank=0, world_size=1):
        batches = random_batches(4, batch_size=4, seed=99)

        def score(model: torch.nn.Module) -> Evaluation:
            self.evaluated.append(split)
            with torch.no_grad():
                predictions = torch.cat(
                    [
                        model(
                            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                        ).logits.argmax(-1)
                        for b in batches
                    ]
                )
            labels = torch.cat([b["labels"] for b in batches])
            confusion = np.zeros((2, 2), dtype=np.int64)
            np.add.at(confusion, (labels.numpy(), predictions.numpy()), 1)
            accuracy = float((predictions == labels).float().mean())
            return Evaluation({"accuracy": accuracy, "own_score": 1.0 - accuracy}, confusion)

        return score


def test_train_runs_any_object_that_implements_the_protocol(tmp_path):
    task = TokenTask()
    assert isinstance(task, TaskKind)
    config = TrainConfig(
        model="any-name",  # the task loads its own model
        method="fim-lora",  # a data-driven method calibrates on the task's batches
        calib_batches=2,
        steps=4,
        batch_size=8,
        eval_every=2,
        lr=1e-2,
        device="cpu",
        out=str(tmp_path),
    )
    result = train(config, task=task, progress=False)
    assert task.evaluated == ["test", "test"]
    assert list(result.curve["step"]) == [2, 4]
    assert {"accuracy", "own_score"} <= set(result.curve)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == "random-tokens" and metrics["class_names"] == ["zero", "one"]
    assert metrics["own_score"] == pytest.approx(1 - metrics["accuracy"])
    assert sum(map(sum, metrics["confusion_matrix"])) == 16
    written = json.loads((tmp_path / "config.json").read_text())["task"]
    assert written == {
        "name": "random-tokens",
        "train": 64,
        "test": 16,
        "class_names": ["zero", "one"],
    }
