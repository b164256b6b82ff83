"""Every image of a dataset checked to decode once, when the dataset is prepared, so that a corrupt file (in any
split, the test split included) is reported before step 1 rather than when it is first decoded.

The result lives beside the prepared files (`FILE` in the builder's data_dir), with the fingerprint of the raw
files it was prepared from (`fingerprint`: where the dataset's name does not already identify them), so that a
dataset whose raw files changed since is prepared again instead of serving the old bytes.
"""

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path

from mora_jax import console
from mora_jax.data import pipeline, preprocess

FILE = "image_check.json"
CHUNK = 64  # images a thread reads and decodes per task
LISTED = 5  # corrupt files a message names; FILE lists them all


def fingerprint(root: str | Path) -> str:
  """Of every file under `root`: its path, size and modification time (a file replaced in place changes it)."""
  root = Path(root).expanduser()
  entries = []
  for folder, _, names in os.walk(root):
    for name in names:
      stat = (Path(folder) / name).stat()
      entries.append(f"{Path(folder, name).relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}")
  return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def read(directory: str | Path) -> dict | None:
  """The check stored with the prepared files in `directory`, or None (prepared before images were checked)."""
  path = Path(directory) / FILE
  return json.loads(path.read_text()) if path.is_file() else None


def write(directory: str | Path, result: dict) -> None:
  path = Path(directory) / FILE
  try:
    path.write_text(json.dumps(result, indent=1))
  except OSError:  # prepared data on a read-only share: the check holds for this run and is repeated by the next
    pass


def _file(record) -> str:
  return pipeline.as_text(record["file"] if "file" in record else record["id"])


def corrupt_files(source, where: str) -> list[str]:
  """The files (a record's "file": a path, a manifest line, an Arrow row) of the records of `source` whose image
  does not decode, or decodes to pixels without an 8-bit meaning (`preprocess.eight_bit`); read and decoded in
  threads, one per core (PIL releases the GIL while it decodes)."""

  def check(start: int) -> list[str]:
    corrupt = []
    for index in range(start, min(start + CHUNK, len(source))):
      record = source[index]
      try:
        preprocess.decode_image(bytes(record["image"]), _file(record))
      except ValueError:
        corrupt.append(_file(record))
    return corrupt

  corrupt = []
  with (concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool,
        console.bar(total=len(source), desc=f"checking the images of {where}", unit="image", leave=False) as bar):
    for part in pool.map(check, range(0, len(source), CHUNK)):
      corrupt += part
      bar.update(min(CHUNK, len(source) - bar.n))
  return corrupt


def message(result: dict, where: str, directory: str | Path, skip_corrupt: bool) -> str | None:
  """One line on the corrupt images of `result` (None if there are none): an error's text with the fixes, or, with
  skip_corrupt, a warning."""
  corrupt = [f"{file} ({split})" for split, check in result["splits"].items() for file in check["corrupt"]]
  if not corrupt:
    return None
  total = sum(check["images"] for check in result["splits"].values())
  named = ", ".join(corrupt[:LISTED]) + (f" and {len(corrupt) - LISTED} more" if len(corrupt) > LISTED else "")
  found = (f"{where}: {len(corrupt)} of {total} images do not decode (corrupt, truncated or not an image) or have "
           f"32-bit integer or float pixels, which have no 8-bit meaning: {named}; all are listed in "
           f"{Path(directory) / FILE}")
  if skip_corrupt:
    return (f"warning: {found}. skip_corrupt=True leaves their samples out of training and evaluation; repair the "
            "files to keep them.")
  return (f"{found}. Repair those files (save 32-bit ones as 8- or 16-bit images) or remove their samples (the "
          "dataset is prepared again when its files change), or pass --config.skip_corrupt=True to train and test "
          "without them.")
