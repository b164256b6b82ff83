"""MM-IMDb, UPMC Food-101 and Hateful Memes as TFDS builders over files the user downloads (docs/protocol.md).

Each reads either the raw layout or the authors' preprocessed `{train,val,test}.arrow` files from
`manual_dir`. Records: "id", "row" (the record's position in its source: the Arrow row, or the raw layout's
split-file order; missing tables are indexed by it), "file" (the image's path under manual_dir, or its Arrow
row), "image" (the encoded file bytes, decoded by the pipeline so that a corrupt file is reported with its
sample id), "texts" (one text, or every plot of a movie), "label" (class index, or the 23-genre multi-hot vector
for MM-IMDb). Splits: train, validation, test, each stored in source order (no TFDS shuffling).

What a build leaves out (genres outside MM-IMDb's 23, Food-101 samples without text) is counted in
`build_notes`, which `data.prepare` logs.
"""

import collections
import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

MMIMDB_GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
                 "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music",
                 "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir")
_ARROW_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _require(path: Path, builder: str) -> Path:
  if not path.exists():
    raise FileNotFoundError(f"{path} not found. {builder} needs files you download yourself; see "
                            f"{builder}.MANUAL_DOWNLOAD_INSTRUCTIONS (or `python -c \"from mora_jax.data."
                            f"builders import manual; print(manual.{builder}.MANUAL_DOWNLOAD_INSTRUCTIONS)\"`).")
  return path


def _numbered(examples):
  """(key, record) pairs with each record's "row": its position in the split's source order."""
  for row, (key, record) in enumerate(examples):
    yield key, {**record, "row": row}


def _read_arrow(path: Path):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  with pa.memory_map(str(path)) as source:
    try:
      table = pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
      source.seek(0)
      table = pa.ipc.open_stream(source).read_all()
  return table.to_pylist()


class _ManualBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared by the three datasets: features, split discovery (raw layout or Arrow), label checks."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Records in source order with their source row (missing tables index by it).",
                   "1.0.0": "Initial release (records in TFDS's key-hash order)."}
  CLASSES: tuple[str, ...] = ()
  MULTI_LABEL = False

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.build_notes: list[str] = []

  def _info(self) -> tfds.core.DatasetInfo:
    label = (tfds.features.Tensor(shape=(len(self.CLASSES),), dtype=np.int8) if self.MULTI_LABEL
             else tfds.features.ClassLabel(num_classes=len(self.CLASSES)))
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     "id": tfds.features.Text(),
                                     "row": np.int64,
                                     "file": tfds.features.Text(),  # where the image came from, for error messages
                                     "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                                     "texts": tfds.features.Sequence(tfds.features.Text()),
                                     "label": label,
                                 }))

  def _split_generators(self, dl_manager):
    try:
      root = Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS asserts on a missing or empty manual_dir; its message has the instructions
      raise FileNotFoundError(str(e)) from e
    if all((root / f"{name}.arrow").is_file() for name in _ARROW_SPLITS.values()):
      return {split: _numbered(self._from_arrow(root / f"{name}.arrow", split))
              for split, name in _ARROW_SPLITS.items()}
    self._read_metadata(root)
    return {split: _numbered(self._generate_examples(root, split)) for split in _ARROW_SPLITS}

  def _read_metadata(self, root: Path) -> None:
    """Reads files that every split of the raw layout needs (none by default)."""

  def _label(self, value, sample: str, source: Path):
    if self.MULTI_LABEL:  # names of the classes present; each dataset decides about names outside CLASSES
      return np.isin(np.asarray(self.CLASSES), list(value)).astype(np.int8)
    if not 0 <= int(value) < len(self.CLASSES):
      raise ValueError(f"{source}: sample {sample} has label {value} outside 0..{len(self.CLASSES) - 1}.")
    return int(value)

  def _from_arrow(self, path: Path, split: str):
    for row, record in enumerate(_read_arrow(path)):
      sample = str(record.get("id", record.get("image_id", f"{split}-{row}")))
      texts = record.get("plots", record.get("text"))
      texts = [texts] if isinstance(texts, str) else list(texts)
      label = record["label"]
      if self.MULTI_LABEL:  # the authors' MM-IMDb arrows hold the 23-genre multi-hot vector
        label = [g for g, on in zip(self.CLASSES, label, strict=True) if on]
      yield sample, {"id": sample, "file": f"{path.name} row {row}", "image": record["image"], "texts": texts,
                     "label": self._label(label, sample, path)}

  def _generate_examples(self, root: Path, split: str):
    """(key, record) pairs of one split of the raw layout; each dataset defines its own."""
    raise NotImplementedError(f"{type(self).__name__} reads no raw layout")


class MmImdb(_ManualBuilder):
  """MM-IMDb: movie poster + plot(s) -> 23 genres (multi-label). One record per movie with all its plots.

  The raw label files keep every IMDb genre; the 23 classes are the most frequent ones, and the others are
  ignored (as the authors' preprocessing does), counted by name in `build_notes`."""

  CLASSES = MMIMDB_GENRES
  MULTI_LABEL = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download MM-IMDb (https://archive.org/details/mmimdb, "mmimdb.tar.gz", research use only) and extract it so
  that `manual_dir` holds `images/<id>.jpeg`, `labels/<id>.json` (fields "plot": list of strings, "genres":
  list) and `split.json` ({"train": [...ids], "dev": [...], "test": [...]}). Alternatively put the authors'
  preprocessed `train.arrow`, `val.arrow`, `test.arrow` there.
  """

  def _generate_examples(self, root: Path, split: str):
    split_file = _require(root / "split.json", "MmImdb")
    ids = json.loads(split_file.read_text())[{"validation": "dev"}.get(split, split)]
    ignored, without_genre = collections.Counter(), 0
    for movie in ids:
      label_file = _require(root / "labels" / f"{movie}.json", "MmImdb")
      info = json.loads(label_file.read_text())
      image = _require(root / "images" / f"{movie}.jpeg", "MmImdb")
      ignored.update(g for g in info["genres"] if g not in self.CLASSES)
      label = self._label(info["genres"], movie, label_file)
      without_genre += not label.any()
      yield str(movie), {"id": str(movie), "file": str(image.relative_to(root)), "image": image.read_bytes(),
                         "texts": list(info["plot"]), "label": label}
    if ignored:
      counts = ", ".join(f"{genre} {count}" for genre, count in sorted(ignored.items(), key=lambda kv: -kv[1]))
      self.build_notes.append(f"MM-IMDb {split}: genres outside the 23 classes ignored ({counts}); "
                              f"{without_genre} of {len(ids)} movies are left with none of the 23.")


class UpmcFood101(_ManualBuilder):
  """UPMC Food-101: dish photo + web page text -> 101 classes. Samples without text are left out (docs/protocol.md)."""

  CLASSES = tuple(str(i) for i in range(101))
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download UPMC Food-101 (http://visiir.lip6.fr/, research use only) with the text files used by the
  missing-modality papers, so that `manual_dir` holds `images/{train,test}/<class>/<file>.jpg`,
  `class_idx.json` (class -> index), `text.json` (file -> text) and `split.json` ({"train": [...files],
  "val": [...], "test": [...]}; val files live under images/train). Alternatively put the authors'
  preprocessed `train.arrow`, `val.arrow`, `test.arrow` there.
  """

  def _read_metadata(self, root: Path) -> None:
    self.class_index = json.loads(_require(root / "class_idx.json", "UpmcFood101").read_text())

  def _generate_examples(self, root: Path, split: str):
    texts = json.loads(_require(root / "text.json", "UpmcFood101").read_text())
    files = json.loads(_require(root / "split.json", "UpmcFood101").read_text())[_ARROW_SPLITS[split]]
    folder = "test" if split == "test" else "train"
    without_text = [file for file in files if file not in texts]
    if without_text:  # docs/protocol.md drops them; say how many so nothing is lost silently
      self.build_notes.append(f"UPMC Food-101 {split}: {len(without_text)} of {len(files)} samples have no text "
                              f"and are left out (e.g. {without_text[0]}).")
    for file in files:
      if file not in texts:
        continue
      name = file.rsplit("_", 1)[0]
      if name not in self.class_index:
        raise ValueError(f"{root / 'split.json'}: sample {file} has class {name!r}, not in class_idx.json.")
      image = _require(root / "images" / folder / name / file, "UpmcFood101")
      yield file, {"id": file, "file": str(image.relative_to(root)), "image": image.read_bytes(),
                   "texts": [texts[file]],
                   "label": self._label(self.class_index[name], file, root / "class_idx.json")}


class HatefulMemes(_ManualBuilder):
  """Hateful Memes: meme image + its text -> hateful or not (two classes). test is the labelled test_seen."""

  CLASSES = ("not hateful", "hateful")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the Hateful Memes data (https://hatefulmemeschallenge.com/, research use only) so that
  `manual_dir` holds `img/<id>.png` and `train.jsonl`, `dev.jsonl`, `test.jsonl` (one JSON object per line
  with "id", "img", "label", "text"; use the labelled test_seen as test.jsonl). Alternatively put the
  authors' preprocessed `train.arrow`, `val.arrow`, `test.arrow` there.
  """

  def _generate_examples(self, root: Path, split: str):
    name = "dev" if split == "validation" else split
    lines_file = _require(root / f"{name}.jsonl", "HatefulMemes")
    for line in lines_file.read_text().splitlines():
      if not line.strip():
        continue
      meme = json.loads(line)
      sample = str(meme["id"])
      image = _require(root / meme["img"], "HatefulMemes")
      yield sample, {"id": sample, "file": meme["img"], "image": image.read_bytes(), "texts": [meme["text"]],
                     "label": self._label(meme["label"], sample, lines_file)}
