"""What easy-VQA's answers give away without the image: the question types' shares of the test set, the
majority answer's accuracy, and a question-only classifier's (bag of words, logistic regression, scikit-learn).

    python bench/easyvqa_priors.py --data_dir data

These are the ceilings the default-run table (README, docs/results.md) is read against: with the text missing a model can do
no better than the answer prior, with the image missing no better than the question alone. The same for the
multimodal LLM's matching task (config.questions="match", docs/mllm.md): each question's majority answer on train,
and each image's best constant answer, both scored on test.
"""

import argparse
import collections

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from mora_jax import data
from mora_jax.data import vqa


def split(name: str, data_dir: str):
  """(question texts, answer ids, question-type names) of every sample of a split."""
  ds = data.load("easy_vqa", name, data_dir, missing=data.Missing(rate=0.0), log=lambda _: None)
  records = [ds.source[i] for i in range(len(ds.source))]
  texts = [r["text"].decode() if isinstance(r["text"], bytes) else r["text"] for r in records]
  labels = np.array([int(r["label"]) for r in records])
  types = [ds.group_names[int(r["question_type"])] for r in records]
  return texts, labels, types


def additive_features(split: vqa.VQASplit) -> list[list[str]]:
  """Per matching question: its image's own colour and shape (the question of its yes sample) and the question."""
  named = [" ".join(w for w in q.rstrip("?").split() if w in split.answer_names) for q in split.questions]
  own = {int(m): n for m, n, t in zip(split.image_index, named, split.question_type) if t == 0}
  return [[own[int(m)], q] for m, q in zip(split.image_index, split.questions)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="data")
  args = parser.parse_args()
  train_texts, train_labels, _ = split("train", args.data_dir)
  test_texts, test_labels, test_types = split("test", args.data_dir)
  shares = collections.Counter(test_types)
  print("question types in test: " + ", ".join(f"{t} {100 * n / len(test_types):.1f}%" for t, n in shares.items()))
  majority = np.bincount(train_labels).argmax()
  print(f"majority answer (from train): {100 * np.mean(test_labels == majority):.1f}% of test")
  vectorizer = CountVectorizer()
  model = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
  predicted = model.predict(vectorizer.transform(test_texts))
  print(f"question words alone (bag of words, logistic regression): {100 * np.mean(predicted == test_labels):.1f}%")
  train, test = (vqa.load(name, args.data_dir, data.Missing(rate=0.0), log=lambda _: None, questions="match")
                 for name in ("train", "test"))
  yes = test.answer_names.index("yes")
  majority = {q: np.mean(train.labels[np.asarray(train.questions) == q] == yes) >= 0.5 for q in set(train.questions)}
  hits = np.mean([majority[q] == (label == yes) for q, label in zip(test.questions, test.labels)])
  print(f"matching task, the question alone (its majority answer on train): {100 * hits:.1f}% of test")
  # An image is in one split only: the best constant answer per test image, fitted on test itself (an upper bound).
  per_image = np.bincount(test.image_index, weights=test.labels == yes)
  asked = np.bincount(test.image_index)
  best = np.maximum(per_image, asked - per_image)[asked > 0].sum() / len(test)
  print(f"matching task, the image alone (its best constant answer, fitted on test): {100 * best:.1f}% of test")
  # Late fusion at its best: a sum of what the image says (its colour and shape, exactly) and what the question says.
  features = [additive_features(split) for split in (train, test)]
  encoder = OneHotEncoder(handle_unknown="ignore").fit(features[0])
  fused = LogisticRegression(max_iter=2000).fit(encoder.transform(features[0]), train.labels == yes)
  hits = np.mean(fused.predict(encoder.transform(features[1])) == (test.labels == yes))
  print(f"matching task, image and question summed (late fusion: logistic regression on the image's true colour and "
        f"shape and the question): {100 * hits:.1f}% of test")


if __name__ == "__main__":
  main()
