"""GLUE metrics as the GLUE benchmark defines them, on scipy / scikit-learn (no ``evaluate``)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

# metric name -> (keys it reports, the main key used for "accuracy drop")
METRICS = {
    "accuracy": ("accuracy",),
    "accuracy_f1": ("accuracy", "f1"),
    "mcc": ("mcc",),
    "pearson_spearman": ("spearmanr", "pearson"),  # STS-B: Spearman first, as the paper
    "squad": ("f1", "exact"),  # computed by experiments.squad.squad_metrics
}


def compute_metrics(metric: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Task metric on predictions (class ids, or scores for regression) and gold labels.

    Values are fractions (0.912, not 91.2). ``accuracy_f1`` (MRPC, QQP) reports both; F1 is of
    the positive class, as in GLUE.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if metric == "accuracy":
        return {"accuracy": float((predictions == labels).mean())}
    if metric == "accuracy_f1":
        return {"accuracy": float((predictions == labels).mean()),
                "f1": float(f1_score(labels, predictions))}
    if metric == "mcc":
        return {"mcc": float(matthews_corrcoef(labels, predictions))}
    if metric == "pearson_spearman":
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearmanr": float(spearmanr(predictions, labels)[0])}
    raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")


def main_metric(metric: str) -> str:
    return METRICS[metric][0]
