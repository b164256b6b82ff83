"""Dataset metrics of docs/protocol.md, vectorised in numpy and equal to scikit-learn's on the same predictions.

Every function takes an optional `valid` mask (False for the padding rows of the last evaluation batch),
and ignores those rows.
"""

import numpy as np


def _select(valid, *arrays):
  if valid is None:
    return arrays
  valid = np.asarray(valid, bool)
  return tuple(np.asarray(a)[valid] for a in arrays)


def accuracy(logits, labels, valid=None) -> float:
  """Top-1 accuracy of integer `labels` [N] against `logits` [N, C] (sklearn.metrics.accuracy_score)."""
  logits, labels = _select(valid, logits, labels)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def grouped_accuracy(logits, labels, groups, group_names, valid=None) -> dict[str, float]:
  """{"accuracy_<name>": top-1 accuracy over the samples whose `groups` [N] id is the index of <name> in
  `group_names`} (easy-VQA's yes/no, color and shape questions); a group without samples is left out."""
  logits, labels, groups = _select(valid, logits, labels, groups)
  groups = np.asarray(groups)
  return {f"accuracy_{name}": accuracy(logits, labels, groups == g) for g, name in enumerate(group_names)
          if np.any(groups == g)}


def _f1(tp, fp, fn):
  """2 TP / (2 TP + FP + FN), 0 where the denominator is 0 (zero_division=0)."""
  denominator = 2 * tp + fp + fn
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def multilabel_f1(logits, labels, valid=None) -> dict[str, float]:
  """F1 of multi-label predictions (logit > 0, i.e. sigmoid > 0.5) against {0,1} `labels` [N, C].

  Returns {"macro", "micro", "samples"} as sklearn.metrics.f1_score(average=..., zero_division=0).
  """
  logits, labels = _select(valid, logits, labels)
  predicted, truth = np.asarray(logits) > 0, np.asarray(labels).astype(bool)
  tp, fp, fn = (predicted & truth), (predicted & ~truth), (~predicted & truth)
  return {
      "macro": float(np.mean(_f1(tp.sum(0), fp.sum(0), fn.sum(0)))),
      "micro": float(_f1(tp.sum(), fp.sum(), fn.sum())),
      "samples": float(np.mean(_f1(tp.sum(1), fp.sum(1), fn.sum(1)))),
  }


def _average_ranks(scores: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(len(scores))
  ranks[order] = np.repeat(group_rank, ends - starts)
  return ranks


def binary_auroc(scores, labels, valid=None) -> float:
  """Area under the ROC curve of `scores` [N] for {0,1} `labels` [N] (sklearn.metrics.roc_auc_score).

  Computed as the Mann-Whitney statistic with average ranks, which counts tied positive/negative pairs as
  one half: the same number as scikit-learn's trapezoidal ROC area.
  """
  scores, labels = _select(valid, scores, labels)
  labels = np.asarray(labels).astype(bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUROC needs both classes among the evaluated samples; got {n_pos} positive and "
                     f"{n_neg} negative. Evaluate on a split (or a larger subset) that has both.")
  ranks = _average_ranks(np.asarray(scores, np.float64))
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def softmax_auroc(logits, labels, valid=None) -> float:
  """AUROC of softmax p(class 1) from two-class `logits` [N, 2] (Hateful Memes)."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  return binary_auroc(probs[:, 1], labels, valid)


# The selection metric of each dataset (docs/protocol.md): the best checkpoint maximises it.
PRIMARY = {"mm_imdb": "f1_macro", "hateful_memes": "auroc"}


def primary(dataset: str, multi_label: bool = False) -> str:
  """The dataset's selection metric; for others (a manifest) accuracy, or F1 macro when multi-label."""
  return PRIMARY.get(dataset, "f1_macro" if multi_label else "accuracy")


def names(multi_label: bool, num_classes: int) -> tuple[str, ...]:
  """The metrics `summary` gives for such labels (besides per-group accuracies)."""
  if multi_label:
    return ("f1_macro", "f1_micro", "f1_samples")
  return ("accuracy", "auroc") if num_classes == 2 else ("accuracy",)


def summary(dataset: str, logits, labels, valid=None, multi_label: bool = False, groups=None,
            group_names=()) -> dict[str, float]:
  """The dataset's metrics by name: F1 macro/micro/samples for multi-label, accuracy otherwise, plus the
  softmax AUROC for two-class datasets and the accuracy per group when `group_names` are given.
  `primary(dataset)` names the one used for selection."""
  if multi_label:
    return {f"f1_{k}": v for k, v in multilabel_f1(logits, labels, valid).items()}
  result = {"accuracy": accuracy(logits, labels, valid)}
  if np.shape(logits)[-1] == 2:
    result["auroc"] = softmax_auroc(logits, labels, valid)
  if group_names:
    result.update(grouped_accuracy(logits, labels, groups, group_names, valid))
  return result
