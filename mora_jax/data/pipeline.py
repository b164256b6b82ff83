"""The Grain input pipeline: seeded per-epoch shuffling, per-process sharding of the index space, batches of
numpy arrays with the missing modality replaced by its dummy input, and checkpointable iterator state. Images
travel as uint8 "pixels" (from a pixel store, or decoded per sample in worker processes) and are normalised on
the devices (`normalize`).

A source is any random-access sequence of records (a TFDS data source, or a list in tests) whose records are
dicts with "id", "image" (uint8 HWC array, or encoded bytes), "text" (str or bytes) and "label" (int, or a
multi-hot vector). Every epoch, in training as in evaluation, sees every sample exactly once: its last batch
is padded with rows that a `valid` mask marks as padding. A batch is a dict: the model inputs under "inputs" (an
`inputs.Decoded`), beside each row's label, index, valid, corrupt and group, which stay on the host.
"""

import atexit
import collections
import contextlib
import dataclasses
import functools
import multiprocessing
import multiprocessing.pool
import sys
import types
from collections.abc import Sequence

import grain
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mora_jax.data import inputs
from mora_jax.data import missing as missing_lib
from mora_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How records become model inputs (the authors' pipeline by default)."""
  image: preprocess.ImageProcessing = preprocess.ImageProcessing()  # the checkpoint's preprocessor config
  max_length: int = 77
  missing_image: str = "white"  # "white" (MoRA) or "ones_after_norm" (the prompting baselines)
  rewrite_position_75: bool = True  # the authors' collate quirk; only changes truncated texts
  transparency: str = "drop"  # "drop" (the authors' convert("RGB")) or "white" (transformers' compositing)

  def __post_init__(self):
    if self.missing_image not in ("white", "ones_after_norm"):
      raise ValueError(f"missing_image={self.missing_image!r}: use 'white' or 'ones_after_norm'.")
    if self.transparency not in preprocess.TRANSPARENCY:
      raise ValueError(f"transparency={self.transparency!r}: use one of {preprocess.TRANSPARENCY}.")
    if self.image.output_size is None:
      raise ValueError(f"{self.image} gives images of varying size; the model needs one size (center crop, or "
                       "resize to a height and width).")

  def pixels(self, image: Image.Image) -> np.ndarray:
    """A PIL image -> float32 [3, height, width] model input."""
    return preprocess.image_to_pixels(image, self.image, self.transparency)

  def white_pixels(self) -> np.ndarray:
    """MoRA's dummy input for a missing image."""
    return self.pixels(preprocess.white_image(*self.image.output_size))

  def white_array(self) -> np.ndarray:
    """MoRA's dummy input for a missing image, as the pipeline's uint8 [height, width, 3]."""
    return preprocess.image_to_array(preprocess.white_image(*self.image.output_size), self.image, self.transparency)


def normalize(decoded: inputs.Decoded, prep: Preprocessing) -> inputs.Normalized:
  """uint8 pixels [B, H, W, 3] -> the float32 pixel_values [B, 3, H, W] a CLIP forward reads. Meant for inside a
  jitted step, so that 1 byte per value crosses to the devices instead of 4: each value is looked up in
  `preprocess.normalize_table`, which equals the host's float path bit for bit; with
  missing_image="ones_after_norm" a missing image's row is all ones."""
  table = jnp.asarray(preprocess.normalize_table(prep.image))
  pixels = decoded.pixels.astype(jnp.int32)
  values = jnp.stack([table[channel][pixels[..., channel]] for channel in range(table.shape[0])], axis=1)
  if prep.missing_image == "ones_after_norm":
    image_missing = decoded.missing == missing_lib.IMAGE_MISSING
    values = jnp.where(image_missing[:, None, None, None], jnp.ones_like(values), values)
  return inputs.Normalized(values, decoded.input_ids, decoded.attention_mask, decoded.missing)


def tokenize(tokenizer, texts: Sequence[str], prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32 [N, L], attention_mask int32 [N, L]): padded to max_length, truncated keeping EOS last.

  With `rewrite_position_75`, position 75 is set to the pad id where it is not already EOS (the authors'
  collate; for CLIP's tokenizer pad == EOS, so a truncated text is then pooled at position 75).
  """
  encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=prep.max_length,
                      return_tensors="np")
  ids = np.asarray(encoded["input_ids"], np.int32)
  mask = np.asarray(encoded["attention_mask"], np.int32)
  if prep.rewrite_position_75 and prep.max_length > 75:
    ids[:, 75] = np.where(ids[:, 75] != tokenizer.eos_token_id, tokenizer.pad_token_id, ids[:, 75])
  return ids, mask


GROUP_FEATURE = "question_type"


@contextlib.contextmanager
def _main_module_hidden():
  # A spawned process first re-runs the parent's main script (as "__mp_main__"), which breaks any script that
  # trains at top level without an `if __name__ == "__main__"` guard. The workers run only
  # preprocess.decode_chunk, so they are started while __main__ looks like `python -c`'s, which is not re-run.
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


@functools.cache
def _worker_pool(workers: int) -> multiprocessing.pool.Pool:
  # Spawned, not forked: the parent runs JAX's threads, which a fork would copy mid-flight. The workers import
  # only mora_jax.data.preprocess (numpy and PIL), all start here, and exit with their parent: at its exit, or,
  # if it is killed, at the end of their task pipe (a ProcessPoolExecutor's workers outlived a killed parent).
  # One pool per process and worker count, shared by every pipeline (train, validation, test).
  with _main_module_hidden():
    pool = multiprocessing.get_context("spawn").Pool(workers)
  atexit.register(pool.terminate)
  return pool


def decode_arrays(items: Sequence[tuple], prep: Preprocessing, workers: int) -> list:
  """`preprocess.decode_to_array` of each (image, name): uint8 [height, width, 3] pixels, or the error message of
  a corrupt image. In this process (workers=0), or in one chunk per worker over `workers` processes."""
  if workers == 0 or len(items) < 2:
    return preprocess.decode_chunk(list(items), prep.image, prep.transparency)
  size = -(-len(items) // workers)
  return list(decode_stream((items[i:i + size] for i in range(0, len(items), size)), prep, workers))


def decode_stream(chunks, prep: Preprocessing, workers: int):
  """`decode_arrays` of an iterable of chunks of (image, name), yielded one result at a time in order, with at
  most 2 x `workers` chunks in flight (so that a whole split is never held in memory)."""
  if workers == 0:
    for chunk in chunks:
      yield from preprocess.decode_chunk(list(chunk), prep.image, prep.transparency)
    return
  pool, pending = _worker_pool(workers), collections.deque()
  for chunk in chunks:
    pending.append(pool.apply_async(preprocess.decode_chunk, (list(chunk), prep.image, prep.transparency)))
    if len(pending) >= 2 * workers:
      yield from pending.popleft().get()
  while pending:
    yield from pending.popleft().get()


def as_text(value) -> str:
  """A record's text (TFDS gives bytes)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def sample_name(record, source_name: str) -> str:
  where = f" ({as_text(record['file'])})" if "file" in record else ""
  return f"{source_name} sample {as_text(record['id'])}{where}"


def record_image(record, source_name: str) -> Image.Image:
  """A record's image as PIL: encoded bytes are decoded (errors name the sample), arrays converted."""
  value = record["image"]
  if isinstance(value, (bytes, bytearray)):
    return preprocess.decode_image(bytes(value), sample_name(record, source_name))
  return Image.fromarray(np.asarray(value))


class _Batch:
  """Record indices (-1: padding) -> one batch: uint8 pixels (from the pixel store, or decoded per sample over
  the worker processes), tokenized texts, labels, missing codes, and the rows' valid / corrupt / group values.
  Runs in Grain's threads, one batch per call."""

  def __init__(self, source, table: np.ndarray, tokenizer, prep: Preprocessing, source_name: str,
               skip_corrupt: bool, workers: int, store):
    self.source, self.table, self.tokenizer, self.prep = source, table, tokenizer, prep
    self.source_name, self.skip_corrupt, self.workers, self.store = source_name, skip_corrupt, workers, store
    self.white = prep.white_array()
    self.padding_label = np.zeros_like(np.asarray(source[0]["label"])) if len(source) else None

  def _images(self, indices: np.ndarray, records: dict) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels of the rows whose image is present, and which of them are corrupt (masked when skipped)."""
    pixels = np.zeros((len(indices), *self.white.shape), np.uint8)
    corrupt = np.zeros(len(indices), bool)
    if not len(indices):
      return pixels, corrupt
    if self.store is not None:
      order = np.argsort(indices)  # ascending reads of the memory map
      pixels[order], corrupt[order] = self.store.pixels[indices[order]], self.store.corrupt[indices[order]]
      errors = {}
    else:
      decoded = decode_arrays([(records[i]["image"], sample_name(records[i], self.source_name)) for i in indices],
                              self.prep, self.workers)
      errors = {row: out for row, out in enumerate(decoded) if isinstance(out, str)}
      for row, out in enumerate(decoded):
        if row in errors:
          corrupt[row] = True
        else:
          pixels[row] = out
    if corrupt.any() and not self.skip_corrupt:
      row = int(np.argmax(corrupt))
      index = int(indices[row])
      message = errors.get(row) or decode_arrays([(records[index]["image"],
                                                   sample_name(records[index], self.source_name))], self.prep, 0)[0]
      raise ValueError(message if isinstance(message, str) else
                       f"{sample_name(records[index], self.source_name)}: marked corrupt in the pixel store "
                       f"{self.store.directory}, but decodes now; delete that folder to rebuild it.")
    return pixels, corrupt

  def __call__(self, indices: np.ndarray) -> dict:
    indices = np.asarray(indices, np.int64)
    present = indices >= 0
    records = {int(i): self.source[int(i)] for i in indices[present]}
    codes = np.where(present, self.table[np.where(present, indices, 0)], missing_lib.COMPLETE).astype(np.int8)
    with_image = present & (codes != missing_lib.IMAGE_MISSING)
    # A missing image (and padding) is the white dummy; the devices swap in the all-ones one where that is chosen.
    pixels = np.broadcast_to(self.white, (len(indices), *self.white.shape)).copy()
    corrupt = np.zeros(len(indices), bool)
    pixels[with_image], corrupt[with_image] = self._images(indices[with_image], records)
    texts = ["" if not ok or code == missing_lib.TEXT_MISSING else as_text(records[int(i)]["text"])
             for i, ok, code in zip(indices, present, codes)]
    input_ids, attention_mask = tokenize(self.tokenizer, texts, self.prep)
    labels = [np.asarray(records[int(i)]["label"]) if ok else self.padding_label for i, ok in zip(indices, present)]
    # The sample's group for per-group metrics (easy-VQA's question type); -1 where a dataset has none.
    groups = [int(records[int(i)][GROUP_FEATURE]) if ok and GROUP_FEATURE in records[int(i)] else -1
              for i, ok in zip(indices, present)]
    # A corrupt image's row is kept masked (like padding) and counted, so batches and evaluation stay aligned.
    return {"inputs": inputs.Decoded(pixels, input_ids, attention_mask, codes), "label": np.stack(labels),
            "index": indices, "valid": present & ~corrupt, "corrupt": corrupt, "group": np.asarray(groups, np.int8)}


def eval_indices(num_samples: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's record indices, padded with -1 so that every process runs the same number of batches."""
  own = np.arange(process_index, num_samples, process_count)
  per_process = -(-num_samples // process_count)
  padded_length = -(-per_process // batch_size) * batch_size
  return np.concatenate([own, np.full(padded_length - len(own), -1)]).astype(np.int64)


def train_indices(num_samples: int, step_size: int, seed: int) -> grain.MapDataset:
  """Endless record indices, epoch after epoch: each epoch a new seeded shuffle of all samples followed by -1
  (padding) up to a whole number of steps of `step_size` samples, i.e. ceil(N / step_size) steps per epoch, the
  last one smaller, as a PyTorch DataLoader without drop_last runs them."""
  order = grain.MapDataset.range(num_samples).shuffle(seed=seed).repeat(None)
  epoch_length = -(-num_samples // step_size) * step_size

  def index(position: int, _) -> int:
    epoch, offset = divmod(position, epoch_length)
    return order[epoch * num_samples + offset] if offset < num_samples else -1

  return grain.MapDataset.range(epoch_length).repeat(None).map_with_index(index)


def index_batches(num_samples: int, batch_size: int, *, train: bool, seed: int = 0, process_index: int = 0,
                  process_count: int = 1, accum_steps: int = 1) -> grain.MapDataset:
  """This process's record indices per batch (int64 [batch_size], -1 for padding), in the order `batches`
  reads them (see there): what a batch holds, whatever fills it (decoded records, or cached activations)."""
  if train:
    # Process p takes the p-th block of every global micro-batch, so a global batch holds the same samples in
    # the same row order for any process count (row-dependent randomness such as dropout masks then does not
    # depend on how many hosts feed the run).
    global_micro_batch = batch_size * process_count
    return train_indices(num_samples, global_micro_batch * accum_steps, seed).batch(global_micro_batch).map(
        lambda rows: np.asarray(rows[process_index * batch_size:(process_index + 1) * batch_size], np.int64))
  own = eval_indices(num_samples, batch_size, process_index, process_count)
  return grain.MapDataset.source(own.reshape(-1, batch_size))


def batches(source, table: np.ndarray, tokenizer, batch_size: int, *, train: bool, seed: int = 0,
            prep: Preprocessing = Preprocessing(), process_index: int = 0, process_count: int = 1,
            accum_steps: int = 1, num_threads: int = 2, workers: int = 0, store=None, source_name: str = "dataset",
            skip_corrupt: bool = False) -> grain.IterDataset:
  """Batches for this process. `batch_size` is the per-process batch.

  train=True: endless, reshuffled every epoch (seeded). An optimizer step takes `accum_steps` consecutive
  batches (micro-batches); each epoch is ceil(N / step) steps of process_count x batch_size x accum_steps
  samples, its last step padded with masked rows. Each process reads its contiguous block of every global
  micro-batch (process_count x batch_size consecutive samples of the epoch order). train=False: one pass in
  order, every sample exactly once across processes, the last batch padded.
  Images come from `store` (a `pixel_store.PixelStore` of this source and preprocessing) when given, else are
  decoded per sample in `workers` processes (0: in this one); `num_threads` batches are assembled at once. Neither
  changes a batch. Iterate with `iter(...)`; the iterator's `get_state()` / `set_state()` resume mid-epoch.
  A corrupt image raises an error naming the sample; with skip_corrupt=True its row is masked instead
  (`valid` False, `corrupt` True, so callers count and report it) and nothing else is dropped.
  """
  if len(table) != len(source):
    raise ValueError(f"{source_name}: missing table has {len(table)} entries for {len(source)} samples.")
  assemble = _Batch(source, table, tokenizer, prep, source_name, skip_corrupt, workers, store)
  dataset = index_batches(len(source), batch_size, train=train, seed=seed, process_index=process_index,
                          process_count=process_count, accum_steps=accum_steps)
  # Grain keeps at most prefetch_buffer_size batches in flight, so fewer than the threads would idle some.
  return dataset.map(assemble).to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                                 prefetch_buffer_size=max(num_threads, 2)))


def missing_inputs(tokenizer, prep: Preprocessing) -> inputs.Decoded:
  """The model inputs of a sample whose image and text are both missing (one row): each tower's dummy."""
  ids, mask = tokenize(tokenizer, [""], prep)
  return inputs.Decoded(prep.white_array()[None], ids, mask, np.array([missing_lib.IMAGE_MISSING], np.int8))
