"""`load`: a prepared TFDS split as pipeline records, with its missing table and evaluation scenarios.

A dataset is one of `BUILDERS` by name, or `MANIFEST` with a `Manifest` (your own data, builders/manifest.py)."""

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mora_jax.data import image_check
from mora_jax.data import missing as missing_lib
from mora_jax.data import pipeline
from mora_jax.data.builders import easy_vqa, manifest as manifest_lib, manual

BUILDERS = {
    "easy_vqa": easy_vqa.EasyVqa,
    "mm_imdb": manual.MmImdb,
    "upmc_food101": manual.UpmcFood101,
    "hateful_memes": manual.HatefulMemes,
}
MANIFEST = "manifest"  # the dataset name of a manifest of your own data
# Datasets whose images are checked to decode when prepared; easy_vqa draws its own.
IMAGES_FROM_FILES = ("mm_imdb", "upmc_food101", "hateful_memes", MANIFEST)
SCENARIOS = ("complete", "text_missing", "image_missing", "mix")


class _TextView:
  """Random access to records with one "text" each: record j of a multi-text record (an MM-IMDb movie with k
  plots) becomes k samples, or only its first text when `one_sample_per_text` is off.

  Every access checks that the record is the source row the missing table gives its code to (records carry
  their source "row"), so a table can never be applied to other samples than its own."""

  def __init__(self, source, one_sample_per_text: bool, where: str, sources: str = ""):
    self.source, self.where = source, where
    self.sources = sources  # the fingerprint of the raw files prepared (image_check), for the pixel store's key
    if one_sample_per_text and "texts" in source[0]:
      counts = np.array([len(source[i]["texts"]) for i in range(len(source))])
    else:
      counts = np.ones(len(source), np.int64)
    self.base_index = np.repeat(np.arange(len(source)), counts)  # sample -> record (the missing-table index)
    self.text_index = np.concatenate([np.arange(c) for c in counts]) if len(counts) else counts

  def __len__(self) -> int:
    return len(self.base_index)

  def record(self, base: int) -> dict:
    record = self.source[base]
    if "row" in record and int(record["row"]) != base:
      raise ValueError(f"{self.where}: record {base} is source row {int(record['row'])}, so its missing-table "
                       "entry would belong to another sample. The prepared files are out of order: delete them "
                       "and prepare the dataset again.")
    return record

  def __getitem__(self, index: int) -> dict:
    record = dict(self.record(int(self.base_index[index])))
    if "texts" in record:
      texts = record.pop("texts")
      record["text"] = texts[int(self.text_index[index])] if len(texts) else b""
    return record


@dataclasses.dataclass(frozen=True)
class Classes:
  """What a head needs to know of a dataset's labels, from its builder's info (no split is read)."""
  names: tuple[str, ...]
  multi_label: bool
  group_names: tuple[str, ...] = ()  # names of the batches' "group" ids (easy-VQA question types), if any


def _classes(builder: tfds.core.DatasetBuilder) -> Classes:
  features = builder.info.features
  label = features["label"]
  multi_label = not isinstance(label, tfds.features.ClassLabel)
  group = features[pipeline.GROUP_FEATURE] if pipeline.GROUP_FEATURE in features else None
  # A multi-hot label is a plain tensor; its builder names the classes (MM-IMDb's genres, a manifest's).
  return Classes(names=tuple(builder.CLASSES) if multi_label else tuple(label.names), multi_label=multi_label,
                 group_names=tuple(group.names) if group is not None else ())


def classes(name: str, data_dir: str | Path, manual_dir: str | Path | None = None, log=print,
            manifest: manifest_lib.Manifest | None = None, skip_corrupt: bool = False) -> Classes:
  """The dataset's classes (prepared first if it is not yet; `skip_corrupt` as for `prepare`)."""
  return _classes(prepare(name, data_dir, manual_dir, log, manifest, skip_corrupt))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split: `source` (pipeline records), `table` (a missing code per record), and what the head needs."""
  name: str
  split: str
  source: _TextView
  table: np.ndarray
  class_names: tuple[str, ...]
  multi_label: bool
  missing: missing_lib.Missing
  group_names: tuple[str, ...] = ()  # names of the batches' "group" ids (easy-VQA question types), if any

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def scenario(self, kind: str) -> "Dataset":
    """The evaluation views of docs/protocol.md: complete, text_missing (all), image_missing (all), or the mix."""
    codes = {"complete": missing_lib.COMPLETE, "text_missing": missing_lib.TEXT_MISSING,
             "image_missing": missing_lib.IMAGE_MISSING}
    if kind == "mix":
      return self
    if kind not in codes:
      raise ValueError(f"scenario {kind!r}: use one of {SCENARIOS}.")
    return dataclasses.replace(self, table=np.full_like(self.table, codes[kind]))


def _builder(name: str, data_dir: str | Path, manifest: manifest_lib.Manifest | None) -> tfds.core.DatasetBuilder:
  if name == MANIFEST:
    if manifest is None:
      raise ValueError(f"dataset {MANIFEST!r} needs a manifest: set config.manifest.path to your .jsonl or .csv "
                       "file (docs/own_data.md).")
    return manifest_lib.ManifestBuilder(manifest, data_dir=str(data_dir))
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(BUILDERS)}, or {MANIFEST!r} for your own data.")
  return BUILDERS[name](data_dir=str(data_dir))


def _key(name: str, builder: tfds.core.DatasetBuilder) -> str:
  """The dataset's name in missing-table files and messages; a manifest's carries its stem and content hash."""
  config = builder.builder_config_name
  return f"{name}_{config}" if config else name


def is_prepared(name: str, data_dir: str | Path, manifest: manifest_lib.Manifest | None = None) -> bool:
  """Whether `data_dir` already holds the prepared files of dataset `name` (of that manifest)."""
  return (name in BUILDERS or name == MANIFEST) and _builder(name, data_dir, manifest).is_prepared()


def check_source(name: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                 manifest: manifest_lib.Manifest | None = None) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name`, once it is known, and prepared or given what it is built from (a
  manual_dir where the raw files must be downloaded by hand, or the manifest). Reads no data."""
  builder = _builder(name, data_dir, manifest)
  if manual_dir is None and builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not builder.is_prepared():
    cls = type(builder).__name__
    raise FileNotFoundError(
        f"{name} is not prepared in data_dir {data_dir} and no manual_dir was given. {name} is built from files "
        f"you download yourself: set manual_dir to them, as {cls}.MANUAL_DOWNLOAD_INSTRUCTIONS describes "
        f"(`python -c \"from mora_jax.data.builders import manual; print(manual.{cls}.MANUAL_DOWNLOAD_INSTRUCTIONS)\"`).")
  return builder


def _check_images(builder: tfds.core.DatasetBuilder, name: str, sources: str) -> dict:
  """`image_check` of every split of the prepared `builder`, with the fingerprint of the files it was prepared
  from."""
  splits = {}
  for split in builder.info.splits:
    source = encoded_source(builder, split)
    splits[split] = {"images": len(source), "corrupt": image_check.corrupt_files(source, f"{name}/{split}")}
  return {"sources": sources, "splits": splits}


def prepare(name: str, data_dir: str | Path, manual_dir: str | Path | None = None, log=print,
            manifest: manifest_lib.Manifest | None = None, skip_corrupt: bool = False) -> tfds.core.DatasetBuilder:
  """Builds the dataset once per data_dir (with a progress bar on a terminal); later calls reuse the prepared
  files, unless the raw files in `manual_dir` changed since. What a build leaves out (the builder's
  `build_notes`) is passed to `log`. `manifest`: the file of dataset MANIFEST.

  Every image of every split is checked to decode once, when the dataset is prepared (`image_check`): corrupt
  ones are an error naming the files, or, with `skip_corrupt`, a warning passed to `log` (once per process)."""
  builder = check_source(name, data_dir, manual_dir, manifest)
  checks_images = name in IMAGES_FROM_FILES
  # A published dataset's name is fixed, so the raw files it is prepared from are fingerprinted; a manifest's
  # name already carries its images' sizes and times (builders/manifest.py).
  sources = image_check.fingerprint(manual_dir) if checks_images and manual_dir and name != MANIFEST else ""
  checked = image_check.read(builder.data_dir) if checks_images and builder.is_prepared() else None
  changed = bool(checked and checked["sources"] and sources and checked["sources"] != sources)
  if changed:
    log(f"note: files under manual_dir {manual_dir} changed since {name} was prepared from them; preparing it again")
    shutil.rmtree(builder.data_dir)  # what TFDS's overwrite does, which a builder that has read the old files refuses
    builder = _builder(name, data_dir, manifest)
  if not builder.is_prepared() and not sys.stderr.isatty():
    tfds.disable_progress_bar()  # its bars redraw with '\r', which a log file keeps as one endless line
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  builder.download_and_prepare(file_format="array_record", download_config=config)
  for note in getattr(builder, "build_notes", ()):
    log(note)
  if checks_images:
    if checked is None or changed:
      checked = _check_images(builder, name, sources)
      image_check.write(builder.data_dir, checked)
    _report_corrupt(checked, _key(name, builder), builder.data_dir, skip_corrupt, log)
  return builder


_warned_corrupt = set()  # prepared folders whose corrupt images this process has warned of


def _report_corrupt(checked: dict, key: str, directory, skip_corrupt: bool, log) -> None:
  line = image_check.message(checked, key, directory, skip_corrupt)
  if line and not skip_corrupt:
    raise ValueError(line)
  if line and str(directory) not in _warned_corrupt:
    _warned_corrupt.add(str(directory))
    log(line)


def encoded_source(builder: tfds.core.DatasetBuilder, split: str):
  """The split's records with their images still encoded: the pipeline decodes them in its workers (or reads
  none at all from a pixel store), where TFDS would decode every one in the main process."""
  skip = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
          if isinstance(feature, tfds.features.Image)}
  return builder.as_data_source(split, decoders=skip or None)


def load(name: str, split: str, data_dir: str | Path, manual_dir: str | Path | None = None,
         missing: missing_lib.Missing = missing_lib.Missing(), one_sample_per_text: bool = True,
         log=print, manifest: manifest_lib.Manifest | None = None, skip_corrupt: bool = False) -> Dataset:
  """A prepared split with its missing table from `data_dir/missing_tables`: a provided one (the authors'
  `.pt` files under their names, `missing.provided_table_names`) when placed there, else one generated from
  the seed and cached there. `log` gets one line saying which. The table is per base sample (an MM-IMDb movie's
  plots share it), entry i for source row i. A manifest's tables are named after its `_key`. `skip_corrupt`: as
  for `prepare`."""
  builder = prepare(name, data_dir, manual_dir, log, manifest, skip_corrupt)
  key = _key(name, builder)
  if split not in builder.info.splits:
    raise ValueError(f"{key} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  source = encoded_source(builder, split)
  checked = image_check.read(builder.data_dir) or {}
  view = _TextView(source, one_sample_per_text, f"{builder.data_dir}, split {split}", checked.get("sources", ""))
  for row in sorted({0, len(source) - 1} - {-1}):  # both ends before any training: misordered files fail here
    view.record(row)
  table = missing_lib.load_or_build(Path(data_dir) / "missing_tables", key, split, len(source), missing)
  log(f"{key}/{split}: missing {missing.type} {missing.rate}: {table.describe()}")
  labels = _classes(builder)
  return Dataset(name=key, split=split, source=view, table=table.codes[view.base_index],
                 class_names=labels.names, multi_label=labels.multi_label, missing=missing,
                 group_names=labels.group_names)


TRUNCATION_SAMPLE = 2000  # texts of a split measured by `truncation_warning` (evenly spaced), at most


def truncation_warning(ds: Dataset, tokenizer, max_length: int, positions: int | None = None) -> str | None:
  """One warning line when texts of `ds` are longer than `max_length` tokens (which `pipeline.tokenize` cuts),
  with the max_length that keeps them all and 99% of them; None when none is cut. Measured on at most
  TRUNCATION_SAMPLE texts, evenly spaced over the split. `positions`: the most tokens the backbone's text tower
  reads, where its checkpoint fixes it."""
  count = len(ds.source)
  if not count:
    return None
  indices = np.unique(np.linspace(0, count - 1, min(count, TRUNCATION_SAMPLE)).round().astype(int))
  texts = [pipeline.as_text(ds.source[int(i)]["text"]) for i in indices]
  lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
  cut = lengths > max_length
  if not cut.any():
    return None
  measured = f"{int(cut.sum())} of {len(lengths)}" + (f" measured of {count}" if len(lengths) < count else "")
  longest, most = int(lengths.max()), int(np.percentile(lengths, 99, method="higher"))
  keep = {"them all": longest, **({"99%": most} if max_length < most < longest else {})}
  fixes = [f"--config.preprocessing.max_length={length} keeps {what}" for what, length in keep.items()
           if positions is None or length <= positions]
  if positions is not None and longest > positions:
    fixes.append(f"the backbone's text tower reads at most {positions} tokens, which cuts "
                 f"{np.mean(lengths > positions):.1%}: a backbone that reads longer texts keeps more")
  return (f"warning: {ds.name}/{ds.split}: {cut.mean():.1%} of the texts ({measured}) are longer than "
          f"preprocessing.max_length={max_length} tokens and are cut to it; " + "; ".join(fixes) + ".")


def batches(ds: Dataset, batch_size: int, tokenizer, *, train: bool, **options):
  """`pipeline.batches` over a loaded split (options: seed, prep, process_index/count, num_threads,
  skip_corrupt)."""
  return pipeline.batches(ds.source, ds.table, tokenizer, batch_size, train=train,
                          source_name=f"{ds.name}/{ds.split}", **options)
