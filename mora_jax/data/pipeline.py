"""The Grain input pipeline: seeded per-epoch shuffling, per-process sharding of the index space, batches of
numpy arrays with the missing modality replaced by its dummy input, and checkpointable iterator state.

A source is any random-access sequence of records (a TFDS data source, or a list in tests) whose records are
dicts with "id", "image" (uint8 HWC array, or encoded bytes), "text" (str or bytes) and "label" (int, or a
multi-hot vector). Every epoch, in training as in evaluation, sees every sample exactly once: its last batch
is padded with rows that a `valid` mask marks as padding.
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

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


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_image(record, source_name: str) -> Image.Image:
  """A record's image as PIL: encoded bytes are decoded (errors name the sample), arrays converted."""
  value = record["image"]
  if isinstance(value, (bytes, bytearray)):
    where = f" ({_text(record['file'])})" if "file" in record else ""
    return preprocess.decode_image(bytes(value), f"{source_name} sample {_text(record['id'])}{where}")
  return Image.fromarray(np.asarray(value))


GROUP_FEATURE = "question_type"
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")  # the batch keys a CLIP forward reads
# The batch keys the classifier reads: the CLIP inputs and each sample's missing code (by which the prompt
# methods pick their prompts; the other methods ignore it).
CLASSIFIER_INPUTS = MODEL_INPUTS + ("missing",)


class _Decode:
  """Record index -> one preprocessed example (runs in Grain's worker threads)."""

  def __init__(self, source, table: np.ndarray, prep: Preprocessing, source_name: str, skip_corrupt: bool):
    self.source, self.table, self.prep, self.source_name = source, table, prep, source_name
    self.skip_corrupt = skip_corrupt
    self.white = prep.white_pixels()
    self.padding_label = np.zeros_like(np.asarray(source[0]["label"])) if len(source) else None

  def missing_pixels(self) -> np.ndarray:
    return self.white if self.prep.missing_image == "white" else np.ones_like(self.white)

  def padding(self) -> dict:
    """A masked row (index -1) of the right shapes; nothing is read or decoded for it."""
    return {"pixel_values": self.white, "text": "", "label": self.padding_label,
            "missing": np.int8(missing_lib.COMPLETE), "index": np.int64(-1), "valid": np.bool_(False),
            "corrupt": np.bool_(False), "group": np.int8(-1)}

  def __call__(self, index: int) -> dict:
    if index < 0:
      return self.padding()
    valid = True
    record = self.source[index]
    code = int(self.table[index])
    corrupt = False
    if code == missing_lib.IMAGE_MISSING:
      pixels = self.missing_pixels()
    else:
      try:
        pixels = self.prep.pixels(record_image(record, self.source_name))
      except ValueError:
        if not self.skip_corrupt:
          raise
        # Kept as a masked row (like padding) and counted, so batches and evaluation stay aligned.
        pixels, corrupt, valid = np.zeros_like(self.white), True, False
    text = "" if code == missing_lib.TEXT_MISSING else _text(record["text"])
    # The sample's group for per-group metrics (easy-VQA's question type); -1 where a dataset has none.
    group = np.int8(record[GROUP_FEATURE]) if GROUP_FEATURE in record else np.int8(-1)
    return {"pixel_values": pixels, "text": text, "label": np.asarray(record["label"]),
            "missing": np.int8(code), "index": np.int64(index), "valid": np.bool_(valid),
            "corrupt": np.bool_(corrupt), "group": group}


class _Tokenize:
  """A batch with a list of texts -> the same batch with input_ids/attention_mask (one tokenizer call)."""

  def __init__(self, tokenizer, prep: Preprocessing):
    self.tokenizer, self.prep = tokenizer, prep

  def __call__(self, batch: dict) -> dict:
    batch = dict(batch)
    batch["input_ids"], batch["attention_mask"] = tokenize(self.tokenizer, list(batch.pop("text")), self.prep)
    return batch


def _stack(examples: Sequence[dict]) -> dict:
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "text"}
  batch["text"] = [e["text"] for e in examples]
  return batch


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
            accum_steps: int = 1, num_threads: int = 2, source_name: str = "dataset",
            skip_corrupt: bool = False) -> grain.IterDataset:
  """Batches for this process. `batch_size` is the per-process batch.

  train=True: endless, reshuffled every epoch (seeded). An optimizer step takes `accum_steps` consecutive
  batches (micro-batches); each epoch is ceil(N / step) steps of process_count x batch_size x accum_steps
  samples, its last step padded with masked rows. Each process reads its contiguous block of every global
  micro-batch (process_count x batch_size consecutive samples of the epoch order). train=False: one pass in
  order, every sample exactly once across processes, the last batch padded.
  Iterate with `iter(...)`; the iterator's `get_state()` / `set_state()` resume mid-epoch.
  A corrupt image raises an error naming the sample; with skip_corrupt=True its row is masked instead
  (`valid` False, `corrupt` True, so callers count and report it) and nothing else is dropped.
  """
  if len(table) != len(source):
    raise ValueError(f"{source_name}: missing table has {len(table)} entries for {len(source)} samples.")
  decode = _Decode(source, table, prep, source_name, skip_corrupt)
  dataset = index_batches(len(source), batch_size, train=train, seed=seed, process_index=process_index,
                          process_count=process_count, accum_steps=accum_steps)
  dataset = dataset.map(lambda rows: _stack([decode(int(i)) for i in rows])).map(_Tokenize(tokenizer, prep))
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2))


def missing_inputs(tokenizer, prep: Preprocessing) -> dict:
  """The model inputs of a sample whose image and text are both missing (one row): each tower's dummy."""
  decode = _Decode([], np.zeros(0, np.int8), prep, "", False)
  ids, mask = tokenize(tokenizer, [""], prep)
  return {"pixel_values": decode.missing_pixels()[None], "input_ids": ids, "attention_mask": mask}
