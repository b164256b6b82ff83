"""easy-VQA (the `easy-vqa` PyPI package ships the whole dataset in its wheel) as a TFDS builder.

One record per question: 64x64 PNG, the question, its answer among 13 classes, the image id, the question
type, and its row (its position in the split, which keeps the package's question order). A validation
split is carved from train by image id, so no image is in two splits.
"""

import importlib.resources
import json

import numpy as np
import tensorflow_datasets as tfds

VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0
YES_NO = ("yes", "no")
SHAPES = ("circle", "rectangle", "triangle")


def question_type(answer: str) -> str:
  """"yes/no", "shape" or "color": what kind of answer the question asks for."""
  if answer in YES_NO:
    return "yes/no"
  return "shape" if answer in SHAPES else "color"


def _package_data():
  try:
    return importlib.resources.files("easy_vqa") / "data"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError("easy_vqa needs the `easy-vqa` package, which ships the dataset: "
                              "pip install easy-vqa") from e


def answers() -> list[str]:
  return [a.strip() for a in (_package_data() / "answers.txt").read_text().splitlines() if a.strip()]


def validation_image_ids(train_image_ids) -> set[int]:
  ids = np.unique(np.asarray(train_image_ids))
  rng = np.random.default_rng(VALIDATION_SEED)
  return set(rng.choice(ids, int(len(ids) * VALIDATION_FRACTION), replace=False).tolist())


class EasyVqa(tfds.core.GeneratorBasedBuilder):
  """easy-VQA: coloured shapes and questions about them; image + question -> answer."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Records in the package's question order with their row (no TFDS shuffling).",
                   "1.0.0": "easy-vqa 1.0 questions; validation = 10% of train images (seed 0)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "row": np.int64,
            "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="png"),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=answers()),
            "image_id": np.int64,
            "question_type": tfds.features.ClassLabel(names=["yes/no", "color", "shape"]),
        }),
        homepage="https://github.com/vzhou842/easy-VQA",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data is in the easy-vqa wheel
    data = _package_data()
    train = json.loads((data / "train" / "questions.json").read_text())
    test = json.loads((data / "test" / "questions.json").read_text())
    held_out = validation_image_ids([q[2] for q in train])
    return {
        "train": self._generate_examples(data / "train", [q for q in train if q[2] not in held_out], "train"),
        "validation": self._generate_examples(data / "train", [q for q in train if q[2] in held_out], "train"),
        "test": self._generate_examples(data / "test", test, "test"),
    }

  def _generate_examples(self, directory, questions, source_split):
    for row, (text, answer, image_id) in enumerate(questions):
      key = f"{source_split}-{row}"
      yield key, {
          "id": key,
          "row": row,
          "image": (directory / "images" / f"{image_id}.png").read_bytes(),
          "text": text,
          "label": answer,
          "image_id": image_id,
          "question_type": question_type(answer),
      }


def negated(tokens) -> bool:
  """easy-VQA's negative templates: "is there not a red shape?", "is no red shape present?"."""
  return "not" in tokens or "no" in tokens


def _attribute(question: str, answer: str, words) -> str | None:
  """The attribute among `words` (colours or shapes) that a question/answer pair says the image HAS."""
  if answer in words:
    return answer
  if answer not in YES_NO:
    return None
  tokens = question.replace("?", " ").split()
  named = [w for w in words if w in tokens]
  if len(named) != 1:
    return None
  says_yes = (answer == "yes") != negated(tokens)
  return named[0] if says_yes else None


def image_attributes(source, answer_names) -> list[dict]:
  """One record per image whose question/answer pairs name its colour or its shape (what-colour/what-shape
  answers, and yes/no questions that name one colour or shape, negations included: see `negated`), in image-id
  order: {"id", "index" (of its first pair in `source`), "colour", "shape"}, an unknown attribute None."""
  colours = [a for a in answer_names if a not in YES_NO and a not in SHAPES]
  known: dict[int, dict] = {}
  for i in range(len(source)):
    record = source[i]
    text = record["text"].decode() if isinstance(record["text"], bytes) else record["text"]
    answer = answer_names[int(record["label"])]
    entry = known.setdefault(int(record["image_id"]), {"index": i, "colour": None, "shape": None})
    for kind, words in (("colour", colours), ("shape", SHAPES)):
      value = _attribute(text, answer, words)
      if value is not None:
        entry[kind] = value
  return [{"id": str(image_id), **entry} for image_id, entry in sorted(known.items())
          if entry["colour"] is not None or entry["shape"] is not None]


def image_captions(source, answer_names) -> list[dict]:
  """One record per image of `image_attributes`, {"id", "image", "text": "a <colour> <shape>", "label": 0}: the
  caption names what is known ("a blue shape", "a circle")."""
  return [{"id": a["id"], "image": source[a["index"]]["image"], "label": 0,
           "text": f"a {a['colour'] or ''} {a['shape'] or 'shape'}".replace("  ", " ")}
          for a in image_attributes(source, answer_names)]
