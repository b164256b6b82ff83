"""What easy-VQA's answers give away without the image: the question types' shares of the test set, the
majority answer's accuracy, and a question-only classifier's (bag of words, logistic regression, scikit-learn).

    python bench/easyvqa_priors.py --data_dir data

These are the ceilings the default-run table (README, docs/results.md) is read against: with the text missing a model can do
no better than the answer prior, with the image missing no better than the question alone.
"""

import argparse
import collections

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from mora_jax import data


def split(name: str, data_dir: str):
  """(question texts, answer ids, question-type names) of every sample of a split."""
  ds = data.load("easy_vqa", name, data_dir, missing=data.Missing(rate=0.0), log=lambda _: None)
  records = [ds.source[i] for i in range(len(ds.source))]
  texts = [r["text"].decode() if isinstance(r["text"], bytes) else r["text"] for r in records]
  labels = np.array([int(r["label"]) for r in records])
  types = [ds.group_names[int(r["question_type"])] for r in records]
  return texts, labels, types


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


if __name__ == "__main__":
  main()
