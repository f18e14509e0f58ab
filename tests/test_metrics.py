import math

import numpy as np
import pytest

from fisherlora.experiments.metrics import classification_metrics, confusion_matrix


def test_confusion_matrix_counts_pairs():
    matrix = confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], num_classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_binary_metrics_match_the_textbook_formulas():
    # tp=40, fn=10, fp=5, tn=45 (class 1 positive)
    confusion = np.array([[45, 5], [10, 40]])
    scores = classification_metrics(confusion)
    tp, fn, fp, tn = 40, 10, 5, 45
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    assert scores["accuracy"] == pytest.approx(0.85)
    assert scores["mcc"] == pytest.approx(mcc)
    assert scores["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)


def test_constant_predictions_have_zero_mcc_and_perfect_ones_have_one():
    assert classification_metrics(np.array([[5, 0], [5, 0]]))["mcc"] == 0.0
    perfect = classification_metrics(np.diag([3, 4, 5]))
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": pytest.approx(1.0)}


def test_macro_f1_averages_over_the_classes_that_occur():
    # a third class neither true nor predicted on this subset is no error of the model's
    assert classification_metrics(np.diag([5, 5, 0]))["macro_f1"] == 1.0
    # a class that is predicted but never true does count (its F1 is 0)
    scores = classification_metrics(np.array([[4, 0, 1], [0, 5, 0], [0, 0, 0]]))
    assert scores["macro_f1"] == pytest.approx((2 * 4 / 9 + 1.0 + 0.0) / 3)
