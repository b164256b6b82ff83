"""Metrics equal scikit-learn's to 1e-6 on random and edge-case predictions, with padding rows ignored."""

import numpy as np
import pytest
from sklearn import metrics as sk

from mora_jax.data import metrics


def sk_softmax_p1(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True))[:, 1]


@pytest.mark.parametrize("seed", range(5))
def test_random_predictions(seed):
  rng = np.random.RandomState(seed)
  n, c = 200, 23
  ml_logits, ml_labels = rng.randn(n, c), (rng.rand(n, c) < 0.15).astype(int)
  ml_labels[:, 3] = 0  # a class without positives
  ours = metrics.multilabel_f1(ml_logits, ml_labels)
  for average in ("macro", "micro", "samples"):
    assert ours[average] == pytest.approx(
        sk.f1_score(ml_labels, ml_logits > 0, average=average, zero_division=0), abs=1e-6)

  logits, labels = rng.randn(n, 101), rng.randint(0, 101, n)
  assert metrics.accuracy(logits, labels) == pytest.approx(sk.accuracy_score(labels, logits.argmax(-1)), abs=1e-6)

  binary_logits = np.round(rng.randn(n, 2), 1)  # rounding creates many tied scores
  binary_labels = rng.randint(0, 2, n)
  assert metrics.softmax_auroc(binary_logits, binary_labels) == pytest.approx(
      sk.roc_auc_score(binary_labels, sk_softmax_p1(binary_logits)), abs=1e-6)


def test_edge_cases():
  labels = np.array([0, 1, 0, 1, 1, 0])
  assert metrics.binary_auroc(np.zeros(6), labels) == pytest.approx(sk.roc_auc_score(labels, np.zeros(6)))  # 0.5
  scores = np.array([0.1, 0.9, 0.9, 0.9, 0.2, 0.1])
  assert metrics.binary_auroc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.binary_auroc(labels.astype(float), labels) == 1.0

  nothing_predicted = np.full((4, 3), -1.0)
  truth = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
  ours = metrics.multilabel_f1(nothing_predicted, truth)
  for average in ("macro", "micro", "samples"):
    assert ours[average] == sk.f1_score(truth, nothing_predicted > 0, average=average, zero_division=0)
  perfect = metrics.multilabel_f1(np.where(truth, 1.0, -1.0), truth)
  assert perfect["micro"] == 1.0
  assert perfect["macro"] == pytest.approx(sk.f1_score(truth, truth, average="macro", zero_division=0))


def test_single_class_auroc_is_a_clear_error():
  with pytest.raises(ValueError, match="needs both classes.*got 3 positive and 0 negative"):
    metrics.binary_auroc(np.array([0.2, 0.5, 0.9]), np.array([1, 1, 1]))


def test_padding_rows_are_ignored():
  rng = np.random.RandomState(0)
  logits, labels = rng.randn(10, 2), rng.randint(0, 2, 10)
  labels[:2] = [0, 1]
  valid = np.array([True] * 7 + [False] * 3)
  garbage = logits.copy()
  garbage[7:] = 1e6  # padded rows hold junk that would change every metric
  assert metrics.accuracy(garbage, labels, valid) == metrics.accuracy(logits[:7], labels[:7])
  assert metrics.softmax_auroc(garbage, labels, valid) == metrics.softmax_auroc(logits[:7], labels[:7])
  ml = rng.randn(10, 4)
  ml_labels = rng.randint(0, 2, (10, 4))
  assert metrics.multilabel_f1(np.where(valid[:, None], ml, 5.0), ml_labels, valid) == \
      metrics.multilabel_f1(ml[:7], ml_labels[:7])


def test_grouped_accuracy_equals_sklearn_per_group():
  rng = np.random.RandomState(0)
  n = 300
  logits, labels = rng.randn(n, 13), rng.randint(0, 13, n)
  groups = rng.choice([0, 2], n)  # group 1 ("color") has no sample and is left out
  valid = rng.rand(n) < 0.9
  ours = metrics.summary("easy_vqa", logits, labels, valid, groups=groups, group_names=("yes/no", "color", "shape"))
  assert set(ours) == {"accuracy", "accuracy_yes/no", "accuracy_shape"}
  for g, name in ((0, "yes/no"), (2, "shape")):
    rows = valid & (groups == g)
    assert ours[f"accuracy_{name}"] == pytest.approx(
        sk.accuracy_score(labels[rows], logits[rows].argmax(-1)), abs=1e-6)
