"""Classification metrics from a confusion matrix: accuracy, macro-F1, Matthews correlation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fisherlora.stats import all_reduce_sum


def confusion_matrix(
    labels: Sequence[int], predictions: Sequence[int], num_classes: int
) -> np.ndarray:
    """``C[i, j]`` = number of examples of true class i predicted as class j."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(
        matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1
    )
    return matrix


def summed_confusion_matrix(
    labels: Sequence[int], predictions: Sequence[int], num_classes: int, device: torch.device
) -> np.ndarray:
    """:func:`confusion_matrix` of this process's examples, summed over all processes (under
    torch.distributed each holds a share of the test set; a share may be empty)."""
    local = torch.from_numpy(confusion_matrix(labels, predictions, num_classes)).to(device)
    return all_reduce_sum(local).cpu().numpy()


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and the multi-class Matthews correlation (Gorodkin's R_K).

    MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)), with c correct predictions,
    s examples, p_k predictions of class k and t_k true members of class k; 0 when undefined.
    """
    confusion = confusion.astype(np.float64)
    total = confusion.sum()
    correct = np.trace(confusion)
    predicted = confusion.sum(axis=0)
    true = confusion.sum(axis=1)
    tp = np.diag(confusion)
    present = predicted + true > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(present, 2 * tp / (predicted + true), 0.0)
    denominator = np.sqrt((total**2 - (predicted**2).sum()) * (total**2 - (true**2).sum()))
    mcc = (correct * total - (predicted * true).sum()) / denominator if denominator > 0 else 0.0
    return {
        "accuracy": float(correct / total) if total else 0.0,
        # over the classes that occur (true or predicted), as scikit-learn's macro average:
        # a class absent from a small held-out subset is no error of the model's
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "mcc": float(mcc),
    }


def predictions_collapsed(confusion: np.ndarray | Sequence[Sequence[int]] | None) -> bool:
    """Whether every prediction fell in one class while the true labels span at least two: the
    run collapsed to a constant classifier (MCC 0, accuracy the majority share), which a run of
    too few steps for its data, or with a learning rate too high or too low, ends as. ``False``
    without a matrix (language-modelling tasks) or without examples."""
    if confusion is None:
        return False
    matrix = np.asarray(confusion)
    if matrix.sum() == 0:
        return False
    predicted_classes = int((matrix.sum(axis=0) > 0).sum())
    true_classes = int((matrix.sum(axis=1) > 0).sum())
    return predicted_classes == 1 and true_classes >= 2


def collapse_warning(
    confusion: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    *,
    steps: int,
    lr: float,
) -> str:
    """The one-line warning for a collapsed run (:func:`predictions_collapsed`), naming the class
    every example went to and the likely cause."""
    matrix = np.asarray(confusion)
    only = int(np.argmax(matrix.sum(axis=0)))
    name = class_names[only] if only < len(class_names) else str(only)
    return (
        f"fisherlora: warning: the model predicts {name!r} for every held-out example (it "
        f"collapsed to one class: MCC 0). Likely cause: too few steps ({steps}) for the data, or "
        f"a learning rate ({lr:g}) too high or too low; try more --steps or another --lr"
    )
