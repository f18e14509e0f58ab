"""The validation split, training subsets and the tune/final phases: the test split is read once
per final run, never in a tuning run, and every evaluation during training reads validation."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pandas as pd
import pytest
import torch

import fisherlora.experiments.generation_eval as generation_eval
import fisherlora.experiments.task_kinds.classification as classification
import fisherlora.experiments.task_kinds.generation as generation
from fisherlora.errors import ConfigError
from fisherlora.experiments.generation_tasks import as_generation_task
from fisherlora.experiments.task_kinds.classification import evaluate
from fisherlora.experiments.tasks import train_subset, validation_mask
from fisherlora.experiments.train import TrainConfig, train
from tests.test_train import tiny_config


def test_validation_is_carved_from_train_disjoint_and_stable(keyword_task):
    task = keyword_task.carve_validation(0.2)
    assert set(task.val_texts).isdisjoint(task.train_texts)
    assert set(task.val_texts).isdisjoint(task.test_texts)
    assert sorted(task.val_texts + task.train_texts) == sorted(keyword_task.train_texts)
    assert task.test_texts == keyword_task.test_texts  # test is untouched
    assert 0.1 < len(task.val_texts) / len(keyword_task.train_texts) < 0.3
    labels = dict(zip(keyword_task.train_texts, keyword_task.train_labels, strict=True))
    assert all(labels[t] == y for t, y in zip(task.val_texts, task.val_labels, strict=True))
    # membership depends on the text alone: another order of the data gives the same split
    order = list(range(len(keyword_task.train_texts)))
    random.Random(3).shuffle(order)
    shuffled = replace(
        keyword_task,
        train_texts=[keyword_task.train_texts[i] for i in order],
        train_labels=[keyword_task.train_labels[i] for i in order],
    )
    assert set(shuffled.carve_validation(0.2).val_texts) == set(task.val_texts)
    assert task.sizes() == {
        "train": len(task.train_texts),
        "test": len(task.test_texts),
        "validation": len(task.val_texts),
    }


def test_validation_of_a_generation_task_keeps_class_labels(keyword_task):
    task = as_generation_task(keyword_task, "classify").carve_validation(0.2)
    assert task.val_prompts and len(task.val_labels) == len(task.val_prompts)
    assert all(
        task.choices[y] == c for y, c in zip(task.val_labels, task.val_completions, strict=True)
    )
    view = task.validation_view()
    assert view.test_prompts == task.val_prompts and view.test_labels == task.val_labels


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.6, math.nan])
def test_a_validation_fraction_outside_the_range_is_refused(fraction):
    with pytest.raises(ConfigError, match="validation fraction"):
        validation_mask(["a", "b", "c"], fraction)


def test_a_validation_split_that_leaves_nothing_is_refused():
    with pytest.raises(ConfigError, match="both need at least one"):
        validation_mask(["only one text"], 0.5)


def test_train_subset_is_fixed_and_bounded():
    assert train_subset(100, 10) == train_subset(100, 10)  # one subset for every run seed
    assert len(set(train_subset(100, 10))) == 10
    with pytest.raises(ConfigError, match="larger than the training split"):
        train_subset(100, 101)
    with pytest.raises(ConfigError, match="one batch"):
        train_subset(100, 4, min_size=8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"val_fraction": 0.7}, "val_fraction"),
        ({"phase": "tune"}, "needs val_fraction"),
        ({"phase": "test"}, "phase"),
        ({"train_size": 8}, "at least one batch"),
    ],
)
def test_bad_split_settings_are_refused_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_a_train_size_above_the_training_split_is_refused(keyword_task):
    with pytest.raises(ConfigError, match="larger than the training split"):
        train(tiny_config(train_size=5000), task=keyword_task, progress=False)


def count_evaluations(monkeypatch) -> list[int]:
    """Record the number of examples each evaluation reads."""
    sizes: list[int] = []
    original = classification.evaluate

    def spy(model, loader, num_labels, device):
        scores, confusion = original(model, loader, num_labels, device)
        sizes.append(int(confusion.sum()))
        return scores, confusion

    monkeypatch.setattr(classification, "evaluate", spy)
    return sizes


def test_a_tuning_run_never_reads_the_test_split(monkeypatch, keyword_task):
    sizes = count_evaluations(monkeypatch)
    config = tiny_config(steps=20, eval_every=10, val_fraction=0.25, phase="tune", train_size=256)
    result = train(config, task=keyword_task, progress=False)
    n_val = len(keyword_task.carve_validation(0.25).val_texts)
    assert sizes == [n_val, n_val]  # two evaluations, validation only
    assert "accuracy" not in result.metrics and result.metrics["confusion_matrix"] is None
    assert {"val_accuracy", "val_nll", "val_auc"} <= set(result.metrics)
    assert result.metrics["phase"] == "tune" and result.metrics["lr"] == config.lr
    assert set(result.curve["split"]) == {"validation"}


def test_a_final_run_reads_the_test_split_once_at_the_end(monkeypatch, tmp_path, keyword_task):
    sizes = count_evaluations(monkeypatch)
    config = tiny_config(tmp_path, steps=20, eval_every=5, val_fraction=0.25)
    result = train(config, task=keyword_task, progress=False)
    n_val = len(keyword_task.carve_validation(0.25).val_texts)
    assert sizes == [n_val] * 4 + [len(keyword_task.test_texts)]
    metrics = result.metrics
    assert sum(map(sum, metrics["confusion_matrix"])) == len(keyword_task.test_texts)
    assert metrics["val_auc"] == pytest.approx(result.curve["accuracy"].mean())
    assert metrics["val_accuracy"] == result.curve["accuracy"].iloc[-1]
    assert 0 < metrics["nll"] < 10


def test_evaluate_reports_the_true_class_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    labels = torch.tensor([0, 1, 1])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits[input_ids[:, 0]]})()

    batch = {
        "input_ids": torch.arange(3).unsqueeze(1),
        "attention_mask": torch.ones(3, 1, dtype=torch.long),
        "labels": labels,
    }
    scores, _ = evaluate(Fixed(), [batch], 2, torch.device("cpu"))
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert scores["nll"] == pytest.approx(expected)
    assert scores["accuracy"] == pytest.approx(2 / 3)


def test_a_task_without_validation_has_no_view(keyword_task):
    with pytest.raises(ConfigError, match="task 'keywords' has no validation split"):
        keyword_task.validation_view()
    assert TrainConfig().val_fraction == 0.0  # `fisherlora train` keeps reading test by default


def test_a_generation_task_validates_on_its_own_split_and_scores_the_completion_nll(
    monkeypatch, keyword_task
):
    """Classification by generation: the evaluations during training read the validation pairs,
    the test split is scored once at the end, and the NLL is the true completion's −log p."""
    sizes: list[int] = []
    original = generation.evaluate_choices

    def spy(model, task, *args, **kwargs):
        scores, confusion = original(model, task, *args, **kwargs)
        sizes.append(int(confusion.sum()))
        return scores, confusion

    monkeypatch.setattr(generation, "evaluate_choices", spy)
    tables: list[torch.Tensor] = []  # each evaluation's log p(c_k | prompt), [examples, classes]
    choice_scores = generation_eval._choice_scores

    def recording(*args, **kwargs):
        tables.append(choice_scores(*args, **kwargs))
        return tables[-1]

    monkeypatch.setattr(generation_eval, "_choice_scores", recording)
    small = replace(
        keyword_task,
        train_texts=keyword_task.train_texts[:160],
        train_labels=keyword_task.train_labels[:160],
        test_texts=keyword_task.test_texts[:24],
        test_labels=keyword_task.test_labels[:24],
    )
    task = as_generation_task(small, "classify")
    config = TrainConfig(
        model="tiny-llama-lm",
        steps=4,
        batch_size=8,
        lr=1e-2,
        eval_every=2,
        max_length=24,
        eval_batch_size=8,
        device="cpu",
        val_fraction=0.2,
    )
    result = train(config, task=task, progress=False)
    n_val = len(task.carve_validation(0.2).val_prompts)
    assert sizes == [n_val, n_val, 24]
    # nll: the mean over examples of −log p(true completion | prompt) (the scores themselves
    # are checked against the model's own loss in test_causal_lm)
    for table, labels, key in (
        (tables[-1], task.test_labels, "nll"),
        (tables[-2], task.carve_validation(0.2).val_labels, "val_nll"),
    ):
        true = table[torch.arange(len(labels)), torch.tensor(labels)]
        assert result.metrics[key] == pytest.approx(-true.double().mean().item(), rel=1e-6)


def test_a_tuning_run_judges_collapse_on_validation(monkeypatch, keyword_task):
    import numpy as np

    def one_class(model, loader, num_labels, device):
        confusion = np.array([[5, 0], [7, 0]])  # every prediction is class 0
        return {"accuracy": 5 / 12, "macro_f1": 0.3, "mcc": 0.0, "nll": 0.7}, confusion

    monkeypatch.setattr(classification, "evaluate", one_class)
    config = tiny_config(steps=2, eval_every=1, val_fraction=0.25, phase="tune", train_size=64)
    assert train(config, task=keyword_task, progress=False).metrics["collapsed"] is True


def test_convergence_columns_name_the_evaluation_they_read():
    from fisherlora.experiments.report import accuracy_at_fractions

    curve = pd.DataFrame({"step": [20, 40, 60, 80, 100], "accuracy": [0.5, 0.6, 0.7, 0.8, 0.9]})
    # 10 % and 25 % both read step 20; 50 % is equally near 40 and 60: the earlier
    assert accuracy_at_fractions(curve, 100) == {
        "val_acc_at_20pct": 0.5,
        "val_acc_at_40pct": 0.6,
        "val_acc_at_100pct": 0.9,
    }
    imdb = pd.DataFrame({"step": [17, 34, 50], "accuracy": [0.6, 0.7, 0.8]})
    # 10, 25 and 50 % (steps 5, 12.5, 25) are all nearest step 17, which is 34 % of the run
    assert accuracy_at_fractions(imdb, 50) == {"val_acc_at_34pct": 0.6, "val_acc_at_100pct": 0.8}
    assert accuracy_at_fractions(pd.DataFrame(), 100) == {}


def test_the_validation_auc_weighs_each_evaluation_by_the_steps_it_stands_for():
    from fisherlora.experiments.train import validation_auc

    # evenly spaced: the mean of the evaluations (as every cell whose eval_every divides steps)
    assert validation_auc([20, 40, 60], [0.5, 0.6, 0.7]) == pytest.approx(0.6)
    # 50 steps, eval_every 17: evaluations at 17, 34, 50 stand for 17, 17 and 16 steps
    expected = (17 * 0.6 + 17 * 0.7 + 16 * 0.9) / 50
    assert validation_auc([17, 34, 50], [0.6, 0.7, 0.9]) == pytest.approx(expected)
    assert expected != pytest.approx((0.6 + 0.7 + 0.9) / 3)
