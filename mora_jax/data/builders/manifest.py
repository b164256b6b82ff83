"""Your own image-text data: a manifest (`.jsonl` or `.csv`, one row per sample) as a TFDS dataset.

A row has "text", an image ("image": a path, relative to the manifest's folder or `image_root`, or absolute;
or "image_base64": the encoded file inline), a class ("label": one class name) or classes ("labels": a list
of class names, multi-label; in csv one cell with the names separated by "|"), and optionally "id" and
"split" (train, validation or test). Without a "split" column the rows are split at random (seeded) by
`split_fractions`.

The prepared files live in `data_dir/manifest/<manifest stem>_<content hash>/`: the hash covers the
manifest's bytes, the image root, the split options and each image file's size and modification time, so
editing the manifest or replacing an image prepares it again and two manifests never share files. Records are
those of builders/manual.py ("id", "row", "file", "image" bytes, "text", "label"), stored in manifest order
within each split.
"""

import base64
import binascii
import csv
import dataclasses
import hashlib
import io
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "validation", "test")
LABELS_SEPARATOR = "|"  # between the class names of a csv "labels" cell
# How spreadsheets and pandas write a missing value into a cell (any case): as a label, a class only if listed.
MISSING_VALUES = ("nan", "none", "null")


@dataclasses.dataclass(frozen=True)
class Manifest:
  """Where a manifest is and how to read it (config.manifest)."""
  path: str
  image_root: str = ""  # the folder relative image paths are under; "" = the manifest's folder
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/validation/test, rows without "split"
  seed: int = 0  # of that split
  classes: tuple[str, ...] = ()  # the classes in the head's order; () = the sorted names the manifest uses


@dataclasses.dataclass(frozen=True)
class Sample:
  """One manifest row, checked (its image is read when the dataset is prepared)."""
  line: int
  id: str
  image: Path | bytes  # the image file, or its bytes given inline
  text: str
  labels: tuple[str, ...]  # one name for a single-label manifest


@dataclasses.dataclass(frozen=True)
class Contents:
  """A read manifest: its samples per split and its classes."""
  path: Path
  digest: str  # of the manifest's bytes and the options that change what is prepared
  class_names: tuple[str, ...]
  multi_label: bool
  splits: dict[str, list[Sample]]


def _error(path: Path, line: int, problem: str, fix: str) -> ValueError:
  return ValueError(f"{path}, line {line}: {problem}. {fix}")


def _jsonl_rows(path: Path, text: str):
  for line, content in enumerate(text.splitlines(), start=1):
    if not content.strip():
      continue
    try:
      fields = json.loads(content)
    except json.JSONDecodeError as e:
      raise _error(path, line, f"not a JSON object ({e.msg})", "Write one JSON object per line.") from e
    if not isinstance(fields, dict):
      raise _error(path, line, f"a JSON {type(fields).__name__}, not an object", "Write one JSON object per line.")
    yield line, fields


def _check_header(fields: list[str], path: Path, line: int) -> None:
  """A header of distinct column names, separated by commas: csv.DictReader reads another separator as one
  column and keeps the last of two columns of one name, and neither would be what the rows say."""
  if len(fields) == 1 and (separator := next((s for s in (";", "\t") if s in fields[0]), None)):
    raise _error(path, line, f"the header {fields[0]!r} is one column: its columns are separated by {separator!r}",
                 "Save the manifest with commas between the cells (a .csv manifest's separator).")
  twice = sorted({name for name in fields if fields.count(name) > 1})
  if twice:
    raise _error(path, line, f"the header names the column(s) {twice} twice",
                 "Give every column its own name (only one is read).")


def _csv_rows(path: Path, text: str):
  reader = csv.DictReader(io.StringIO(text))
  if reader.fieldnames is None:
    return
  _check_header(reader.fieldnames, path, reader.line_num)
  for fields in reader:
    if None in fields or None in fields.values():  # more or fewer cells than the header has columns
      raise _error(path, reader.line_num, f"its cells do not match the {len(reader.fieldnames)} columns "
                   f"{reader.fieldnames}", "Give every row one cell per column (quote cells that hold commas).")
    # An empty cell is a value not given, but for a text ("" is none) or the class list of a multi-label row.
    yield reader.line_num, {key: value for key, value in fields.items() if value != "" or key in ("text", "labels")}


def _class_name(value, path: Path, line: int, key: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
    raise _error(path, line, f'"{key}" holds {value!r}', "Class names are non-empty strings.")
  if isinstance(value, str) and value != value.strip():
    raise _error(path, line, f'"{key}" holds {value!r}, with spaces at an end', "Remove them: names are matched "
                 f"exactly, so {value!r} and {value.strip()!r} would be two classes.")
  return str(value)


def _spelling(value) -> str:
  """A class name's spelling as written: a JSON number is not the string of its digits."""
  return repr(value) if isinstance(value, str) else f"{value} (a number)"


def _check_spellings(rows: list[tuple[int, dict]], path: Path, multi_label: bool, given: tuple[str, ...]) -> None:
  """One class, one spelling: labels that differ only in type (1 and "1", merged into one class), case, inner
  spaces or Unicode form ("Cat" and "cat", two classes) are an error naming a line of each, unless
  manifest.classes lists them as different classes. The rows' labels are valid names (`_labels`)."""
  spellings = {}  # normalised name -> {spelling: (first line, name)}
  for line, fields in rows:
    for value in _written_names(fields["labels" if multi_label else "label"], multi_label):
      normal = " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())
      spellings.setdefault(normal, {}).setdefault(_spelling(value), (line, str(value)))
  for found in spellings.values():
    names = {name for _, name in found.values()}
    if len(found) < 2 or (len(names) == len(found) and names <= set(given)):
      continue
    (first, (line, name)), (second, (other_line, other_name)) = sorted(found.items(), key=lambda item: item[1][0])[:2]
    where = f"{path}, line {line}" if line == other_line else f"{path}, lines {line} and {other_line}"
    if name == other_name:
      raise ValueError(f"{where}: labels {first} and {second} are merged into one class {name!r}. Write every label "
                       "of a class the same way (all strings, or all numbers).")
    raise ValueError(f"{where}: labels {first} and {second} differ only in case, spaces or Unicode form, so they "
                     "would be two classes. Write every label of a class the same way, or, if they are different "
                     "classes, list both in manifest.classes.")


def _check_missing_values(samples: list[Sample], path: Path, given: tuple[str, ...]) -> None:
  """A label "nan", "None" or "null" is a missing value exported as text, not a class, unless manifest.classes
  lists it."""
  for sample in samples:
    for name in sample.labels:
      if name.casefold() in MISSING_VALUES and name not in given:
        raise _error(path, sample.line, f"label {name!r} is how a missing value is written, not a class name",
                     f"Give the row its class, or, if {name!r} is a class, list the classes in manifest.classes.")


def _check_ids(samples: list[Sample], path: Path) -> None:
  first_line = {}
  for sample in samples:
    if sample.id in first_line:
      raise ValueError(f"{path}, lines {first_line[sample.id]} and {sample.line}: both have id {sample.id!r}. Give "
                       "every row its own id (a row without one is named by its line number).")
    first_line[sample.id] = sample.line


def _check_trained(splits: dict[str, list[Sample]], path: Path, random_split: bool) -> None:
  """Every class that a validation or test row has is trained by some train row."""
  trained = {name for sample in splits["train"] for name in sample.labels}
  untrained = {}  # class -> first line of it outside train
  for sample in sorted(splits["validation"] + splits["test"], key=lambda s: s.line):
    for name in sample.labels:
      if name not in trained:
        untrained.setdefault(name, sample.line)
  if untrained:
    named = ", ".join(f"{name!r} (line {line})" for name, line in list(untrained.items())[:5])
    fix = ("Add train rows of them, or remove their validation and test rows" +
           (", or change manifest.seed or manifest.split_fractions" if random_split else "") + ".")
    raise ValueError(f"{path}: {len(untrained)} class(es) appear in validation or test but in no train row, so "
                     f"no sample trains them: {named}. {fix}")


def _labels(fields: dict, path: Path, line: int, multi_label: bool) -> tuple[str, ...]:
  key, other = ("labels", "label") if multi_label else ("label", "labels")
  if other in fields or key not in fields:
    raise _error(path, line, f'a "{other}" where the first row has "{key}"' if other in fields else f'no "{key}"',
                 f'Give every row "{key}" ("label": one class name; "labels": a list, for multi-label).')
  if multi_label and not isinstance(fields[key], (str, list)):
    raise _error(path, line, f'"labels" holds {fields[key]!r}', "Give a list of class names.")
  return tuple(dict.fromkeys(_class_name(v, path, line, key) for v in _written_names(fields[key], multi_label)))


def _written_names(value, multi_label: bool) -> list:
  """The class names of a row's label field as written: one, a list, or a csv cell's names separated by "|"."""
  if not multi_label:
    return [value]
  if isinstance(value, str):  # a csv cell
    return [name.strip() for name in value.split(LABELS_SEPARATOR) if name.strip()]
  return value


def _image(fields: dict, path: Path, line: int, root: Path) -> Path | bytes:
  if ("image" in fields) == ("image_base64" in fields):
    raise _error(path, line, 'both "image" and "image_base64"' if "image" in fields else "no image",
                 'Give each row one of "image" (a file path) or "image_base64" (the encoded file).')
  if "image_base64" in fields:
    try:
      return base64.b64decode(fields["image_base64"], validate=True)
    except (binascii.Error, TypeError) as e:
      raise _error(path, line, f'"image_base64" is not base64 ({e})', "Encode the image file's bytes.") from e
  return root / str(fields["image"])  # an absolute path stays as it is


def _sample(fields: dict, path: Path, line: int, root: Path, multi_label: bool) -> Sample:
  if not isinstance(fields.get("text"), str):
    raise _error(path, line, 'no "text" string', 'Give every row a "text" ("" for none).')
  sample_id = line if fields.get("id") is None else fields["id"]  # a null id is none given, as an empty csv cell
  return Sample(line=line, id=str(sample_id), image=_image(fields, path, line, root), text=fields["text"],
                labels=_labels(fields, path, line, multi_label))


def _image_stats(samples: list[Sample], path: Path) -> str:
  """Each image file's path, size and modification time, one line each."""
  stats = []
  for sample in samples:
    if isinstance(sample.image, Path):
      if not sample.image.is_file():
        raise _error(path, sample.line, f"image {sample.image} not found", "Fix the path (relative paths are under "
                     "the manifest's folder, or manifest.image_root).")
      stat = sample.image.stat()
      stats.append(f"{sample.image}\0{stat.st_size}\0{stat.st_mtime_ns}")
  return "\n".join(stats)


def _random_splits(samples: list[Sample], fractions, seed: int, path: Path) -> dict[str, list[Sample]]:
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
    raise ValueError(f"{path} has no \"split\" column, so its rows are split by manifest.split_fractions, "
                     f"which must be 3 fractions (train, validation, test) >= 0 that sum to 1; got {fractions}.")
  order = np.random.default_rng(seed).permutation(len(samples))
  ends = np.round(np.cumsum(fractions) * len(samples)).astype(int)
  parts = np.split(order, ends[:2])
  return {split: [samples[i] for i in sorted(part)] for split, part in zip(SPLITS, parts)}


def _given_splits(rows: list[tuple[int, dict]], samples: list[Sample], path: Path) -> dict[str, list[Sample]]:
  splits = {split: [] for split in SPLITS}
  for (line, fields), sample in zip(rows, samples):
    if "split" not in fields:
      raise _error(path, line, 'no "split", where other rows have one',
                   'Give every row a "split" (train, validation or test), or none to split at random.')
    if fields["split"] not in splits:
      raise _error(path, line, f"unknown split {fields['split']!r}", f"Use one of {', '.join(SPLITS)}.")
    splits[fields["split"]].append(sample)
  return splits


def _check_class_count(class_names: tuple[str, ...], multi_label: bool, path: Path) -> None:
  """A single-label head needs 2 classes (with one, every prediction is right), a multi-label head 1 (with none it
  has no outputs)."""
  needed = 1 if multi_label else 2
  if len(class_names) < needed:
    kind = "a multi-label" if multi_label else "a single-label"
    raise ValueError(f"{path}: the labels name {len(class_names)} class(es) {list(class_names)}, but {kind} "
                     f"classifier needs at least {needed}. Label the rows with their classes, or list every class "
                     "in manifest.classes (e.g. --config.manifest.classes=cat,dog).")


def _class_names(samples: list[Sample], given: tuple[str, ...], path: Path) -> tuple[str, ...]:
  if not given:
    return tuple(sorted({name for sample in samples for name in sample.labels}))
  if len(set(given)) != len(given):
    raise ValueError(f"manifest.classes lists a class twice: {list(given)}.")
  for sample in samples:
    unknown = [name for name in sample.labels if name not in given]
    if unknown:
      raise _error(path, sample.line, f"label {unknown[0]!r} is not in the class list {list(given)}",
                   "Fix the label, or add the class to manifest.classes.")
  return tuple(given)


def read(manifest: Manifest) -> Contents:
  """The manifest's samples per split and classes; every row is checked, errors name the line and the fix.
  Image files are found here, not opened (the build reads them, `data.prepare` checks that they decode)."""
  path = Path(manifest.path).expanduser().absolute()
  if path.suffix not in (".jsonl", ".csv"):
    raise ValueError(f"manifest {path}: use a .jsonl or .csv file (one row per sample).")
  if not path.is_file():
    raise FileNotFoundError(f"manifest {path} not found; set manifest.path to your .jsonl or .csv file.")
  content = path.read_bytes()
  root = Path(manifest.image_root).expanduser().absolute() if manifest.image_root else path.parent
  options = json.dumps([str(root), list(manifest.split_fractions), manifest.seed, list(manifest.classes)])
  digest = hashlib.sha256(content + options.encode()).hexdigest()[:12]
  try:
    text = content.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"manifest {path} is not UTF-8 text ({e}); save it as UTF-8.") from e
  rows = list((_jsonl_rows if path.suffix == ".jsonl" else _csv_rows)(path, text))
  if not rows:
    raise ValueError(f"manifest {path} has no rows; write one row per sample.")
  multi_label = "labels" in rows[0][1]
  samples = [_sample(fields, path, line, root, multi_label) for line, fields in rows]
  _check_missing_values(samples, path, manifest.classes)
  _check_spellings(rows, path, multi_label, manifest.classes)
  _check_ids(samples, path)
  # The images' sizes and times join the digest, so that an image replaced in place (a corrupt one repaired) is
  # prepared again rather than served from the prepared files.
  digest = hashlib.sha256(f"{digest}{_image_stats(samples, path)}".encode()).hexdigest()[:12]
  random_split = not any("split" in fields for _, fields in rows)
  if random_split:
    splits = _random_splits(samples, manifest.split_fractions, manifest.seed, path)
  else:
    splits = _given_splits(rows, samples, path)
  for split, members in splits.items():
    if not members:
      raise ValueError(f"manifest {path}: split {split!r} has no rows. Give it some (\"split\": \"{split}\"), "
                       "or, for a manifest without splits, raise its manifest.split_fractions entry.")
  class_names = _class_names(samples, manifest.classes, path)
  _check_class_count(class_names, multi_label, path)
  _check_trained(splits, path, random_split)
  return Contents(path=path, digest=digest, class_names=class_names, multi_label=multi_label, splits=splits)


def _config_name(contents: Contents) -> str:
  stem = re.sub(r"[^a-z0-9]+", "_", contents.path.stem.lower()).strip("_") or "manifest"
  return f"{stem}_{contents.digest}"


class ManifestBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A manifest's samples; one builder config per manifest content (`_config_name`)."""

  name = "manifest"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records in manifest order per split, with their row."}

  def __init__(self, manifest: Manifest, **kwargs):
    self.contents = read(manifest)  # before TFDS's init, which asks `_info` for the classes
    self.CLASSES = self.contents.class_names  # pylint: disable=invalid-name  (as MmImdb's: multi-hot names)
    config = tfds.core.BuilderConfig(name=_config_name(self.contents), description=str(self.contents.path))
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    names = self.contents.class_names
    label = (tfds.features.Tensor(shape=(len(names),), dtype=np.int8) if self.contents.multi_label
             else tfds.features.ClassLabel(names=names))
    return tfds.core.DatasetInfo(builder=self, description=__doc__, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     "id": tfds.features.Text(),
                                     "row": np.int64,
                                     "file": tfds.features.Text(),  # where the image came from, for error messages
                                     "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                                     "text": tfds.features.Text(),
                                     "label": label,
                                 }))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is in the manifest
    return {split: self._generate_examples(split) for split in SPLITS}

  def _label(self, sample: Sample):
    names = self.contents.class_names
    if self.contents.multi_label:
      return np.isin(np.asarray(names), sample.labels).astype(np.int8)
    return names.index(sample.labels[0])

  def _generate_examples(self, split: str):
    path = self.contents.path
    for row, sample in enumerate(self.contents.splits[split]):
      if isinstance(sample.image, bytes):
        image, file = sample.image, f"{path.name} line {sample.line}"
      else:  # found by `read`
        image, file = sample.image.read_bytes(), str(sample.image)
      yield row, {"id": sample.id, "row": row, "file": file, "image": image, "text": sample.text,
                  "label": self._label(sample)}
