"""easy-VQA as prompts and answers for the multimodal LLM (mora_jax.adapters.mllm), with docs/protocol.md's missing
tables and evaluation scenarios.

A split is read once into a `VQASplit`: questions, answers, question types and, per sample, the index of its
image among the split's distinct images (their pixels are decoded once, for the frozen vision tower's feature
cache). Batches are token arrays built from the template (`prompt`): [question: {q} answer:] left-padded, then
[ {answer}</s>] right-padded (the model puts <s> and the image tokens in front). A missing question is the empty
string; a missing image has no image tokens.
"""

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from mora_jax.data import datasets, missing as missing_lib, pipeline
from mora_jax.data.builders import easy_vqa

TEXT_KEYS = ("input_ids", "text_valid", "prompt", "answer")


def prompt(question: str) -> str:
  """The text before the answer (also the embedded LM's pre-training format)."""
  return f"question: {question} answer:"


# Stage 1's questions per image attribute (stage1.data="questions"): easy-VQA's most frequent training wordings.
ATTRIBUTE_QUESTIONS = {"colour": "what color is the shape?", "shape": "what shape is in the image?"}

# What a run is asked (config.questions): easy-VQA's own questions, or the matching task (`VQASplit.match_questions`),
# whose yes/no questions name a colour and a shape together, so that neither the question nor the image alone
# tells the answer: late fusion at its best scores 52.4% (bench/easyvqa_priors.py), early fusion must compare both.
QUESTIONS = ("easy_vqa", "match")
MATCH_TEMPLATES = ("is there a {colour} {shape} in the image?", "does the image contain a {colour} {shape}?")
# The matching task's question types: yes (the image's own colour and shape), no with the colour changed, no with the
# shape changed.
MATCH_TYPES = ("same colour and shape", "other colour", "other shape")


@dataclasses.dataclass(frozen=True)
class VQASplit:
  """One split: per sample its question, answer (label id into `answer_names`), question type id and image index;
  the distinct images' encoded bytes; the missing table (a code per sample). `has_prompt` False: the samples
  are captions, whose text part is "<s>" then the caption."""
  name: str
  questions: tuple[str, ...]
  labels: np.ndarray
  question_type: np.ndarray
  image_index: np.ndarray
  images: tuple[bytes, ...]
  table: np.ndarray
  answer_names: tuple[str, ...]
  type_names: tuple[str, ...]
  has_prompt: bool = True
  image_set: str = ""  # names `images`: splits derived from one another (scenarios, captions) share it
  targets: tuple[str, ...] = ()  # the caption per sample when has_prompt is False

  def __len__(self) -> int:
    return len(self.labels)

  def answer(self, i: int) -> str:
    return self.answer_names[int(self.labels[i])] if self.has_prompt else self.targets[i]

  def scenario(self, kind: str) -> "VQASplit":
    """docs/protocol.md's test views: complete, text_missing (no question), image_missing, or the mix."""
    codes = {"complete": missing_lib.COMPLETE, "text_missing": missing_lib.TEXT_MISSING,
             "image_missing": missing_lib.IMAGE_MISSING}
    if kind == "mix":
      return self
    if kind not in codes:
      raise ValueError(f"scenario {kind!r}: use one of {datasets.SCENARIOS}.")
    return dataclasses.replace(self, table=np.full_like(self.table, codes[kind]))

  def _records(self) -> list[dict]:
    """The split's question/answer pairs as the builder's records, an image's index as its id."""
    return [{"text": q, "label": label, "image_id": int(m), "image": int(m)}
            for q, label, m in zip(self.questions, self.labels, self.image_index)]

  def captions(self) -> "VQASplit":
    """One complete sample per image that the split's question/answer pairs describe ("a red circle", the
    embedded CLIP's captions): stage 1's alignment data (stage1.data="captions")."""
    pairs = easy_vqa.image_captions(self._records(), list(self.answer_names))
    n = len(pairs)
    return dataclasses.replace(self, name=f"{self.name} captions", questions=("",) * n, labels=np.zeros(n, np.int64),
                               question_type=np.zeros(n, np.int64),
                               image_index=np.array([p["image"] for p in pairs], np.int64),
                               table=np.zeros(n, np.int8), has_prompt=False, targets=tuple(p["text"] for p in pairs))

  def attribute_questions(self) -> "VQASplit":
    """Per image that the split's pairs describe, one complete sample per known attribute: ATTRIBUTE_QUESTIONS'
    colour question answered with its colour, its shape question with its shape (stage1.data="questions")."""
    types = {"colour": self.type_names.index("color"), "shape": self.type_names.index("shape")}
    samples = [(question, self.answer_names.index(attribute[kind]), types[kind], int(attribute["id"]))
               for attribute in easy_vqa.image_attributes(self._records(), list(self.answer_names))
               for kind, question in ATTRIBUTE_QUESTIONS.items() if attribute[kind] is not None]
    questions, labels, question_type, image_index = zip(*samples) if samples else ((), (), (), ())
    return dataclasses.replace(
        self, name=f"{self.name} attribute questions", questions=tuple(questions),
        labels=np.array(labels, np.int64), question_type=np.array(question_type, np.int64),
        image_index=np.array(image_index, np.int64), table=np.zeros(len(samples), np.int8))

  def match_questions(self) -> "VQASplit":
    """The matching task: per image whose colour and shape the split's pairs both name, and per MATCH_TEMPLATES
    wording, a question naming its own colour and shape (yes) and one naming the same with one attribute changed
    (no): the colour or the shape, evenly, the new value drawn uniformly among the others. Every image has as many
    yes as no; so has every question, up to how the split's colours and shapes are spread. Drawn from a generator
    seeded by the split's name: every run of a split is asked the same questions. The table is all complete."""
    colours = [a for a in self.answer_names if a not in easy_vqa.YES_NO and a not in easy_vqa.SHAPES]
    rng = np.random.default_rng(zlib.crc32(self.name.encode()))
    yes, no = self.answer_names.index("yes"), self.answer_names.index("no")
    samples = []
    for attribute in easy_vqa.image_attributes(self._records(), list(self.answer_names)):
      colour, shape = attribute["colour"], attribute["shape"]
      if colour is None or shape is None:
        continue
      for template in MATCH_TEMPLATES:
        samples.append((template.format(colour=colour, shape=shape), yes, 0, int(attribute["id"])))
        if rng.random() < 0.5:
          other = rng.choice([c for c in colours if c != colour])
          samples.append((template.format(colour=other, shape=shape), no, 1, int(attribute["id"])))
        else:
          other = rng.choice([s for s in easy_vqa.SHAPES if s != shape])
          samples.append((template.format(colour=colour, shape=other), no, 2, int(attribute["id"])))
    questions, labels, question_type, image_index = zip(*samples) if samples else ((), (), (), ())
    return dataclasses.replace(
        self, name=f"{self.name} match questions", questions=tuple(questions), labels=np.array(labels, np.int64),
        question_type=np.array(question_type, np.int64), image_index=np.array(image_index, np.int64),
        table=np.zeros(len(samples), np.int8), type_names=MATCH_TYPES)


def load(split: str, data_dir: str | Path, missing: missing_lib.Missing, log=print, questions: str = "easy_vqa"
         ) -> VQASplit:
  """easy-VQA's `split` asked `questions` (QUESTIONS), with its missing table: easy-VQA's own questions get the
  same tables as the CLIP runs; the matching task's are tables of dataset "easy_vqa_match". Images are not decoded
  here."""
  if questions not in QUESTIONS:
    raise ValueError(f"questions {questions!r}: use one of {QUESTIONS}.")
  builder = datasets.prepare("easy_vqa", data_dir, log=log)
  source = datasets.encoded_source(builder, split)
  records = source.__getitems__(range(len(source)))
  names = builder.info.features["label"].names
  type_names = tuple(builder.info.features["question_type"].names)
  image_ids = np.array([int(r["image_id"]) for r in records])
  distinct, first, image_index = np.unique(image_ids, return_index=True, return_inverse=True)
  del distinct
  asked = VQASplit(name=f"easy_vqa/{split}", questions=tuple(r["text"].decode() for r in records),
                   labels=np.array([int(r["label"]) for r in records]), answer_names=tuple(names),
                   question_type=np.array([int(r["question_type"]) for r in records]),
                   image_index=image_index.astype(np.int64), images=tuple(records[i]["image"] for i in first),
                   table=np.zeros(len(records), np.int8), type_names=type_names, image_set=f"easy_vqa/{split}")
  dataset = "easy_vqa"
  if questions == "match":
    asked, dataset = asked.match_questions(), "easy_vqa_match"
  table = missing_lib.load_or_build(Path(data_dir) / "missing_tables", dataset, split, len(asked), missing)
  log(f"{asked.name}: missing {missing.type} {missing.rate}: {table.describe()}")
  return dataclasses.replace(asked, table=table.codes)


def decode_images(split: VQASplit, prep: pipeline.Preprocessing) -> np.ndarray:
  """The split's distinct images as model inputs, float32 [N_images, 3, H, W]."""
  return np.stack([prep.pixels(pipeline.record_image({"image": b, "id": f"image {i}"}, split.name))
                   for i, b in enumerate(split.images)])


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static token lengths: the prompt part (left-padded) and the answer part (right-padded, </s> included)."""
  prompt_length: int = 16  # easy-VQA's longest prompt is 14 tokens (embedded tokenizer); <s> is the model's
  answer_length: int = 4  # answers are one token, captions up to three; </s> included


def encode_texts(tokenizer, prompts: Sequence[str], answers: Sequence[str] | None, layout: Layout
                 ) -> dict[str, np.ndarray]:
  """Token arrays [B, T] of TEXT_KEYS; T = prompt_length (+ answer_length when `answers` is given)."""
  b, p = len(prompts), layout.prompt_length
  length = p + (0 if answers is None else layout.answer_length)
  out = {"input_ids": np.full((b, length), tokenizer.pad_token_id, np.int32),
         **{k: np.zeros((b, length), bool) for k in TEXT_KEYS[1:]}}
  prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
  for i, ids in enumerate(prompt_ids):
    if len(ids) > p:
      raise ValueError(f"prompt {prompts[i]!r} has {len(ids)} tokens, more than layout.prompt_length={p}.")
    out["input_ids"][i, p - len(ids):p] = ids
    out["text_valid"][i, p - len(ids):p] = out["prompt"][i, p - len(ids):p] = True
  if answers is not None:
    # A space joins answer and prompt, as in the pre-training text; a caption after "<s>" alone has none.
    texts = [(" " if q else "") + a for q, a in zip(prompts, answers)]
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
      ids = [*ids, tokenizer.eos_token_id]
      if len(ids) > layout.answer_length:
        raise ValueError(f"answer {texts[i]!r} has {len(ids)} tokens with </s>, more than "
                         f"layout.answer_length={layout.answer_length}.")
      out["input_ids"][i, p:p + len(ids)] = ids
      out["text_valid"][i, p:p + len(ids)] = out["answer"][i, p:p + len(ids)] = True
  return out


class Assemble:
  """Sample indices (-1: padding) -> one batch: TEXT_KEYS, `image` (index of the image's features; -1 none),
  `valid` (not padding), question type and, for evaluation, no answer tokens."""

  def __init__(self, split: VQASplit, tokenizer, layout: Layout, with_answers: bool):
    self.split, self.tokenizer, self.layout, self.with_answers = split, tokenizer, layout, with_answers

  def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    split = self.split
    rows = np.asarray(rows)
    safe = np.where(rows >= 0, rows, 0)
    codes = split.table[safe]
    if split.has_prompt:
      prompts = [prompt("" if c == missing_lib.TEXT_MISSING else split.questions[i]) for i, c in zip(safe, codes)]
    else:
      prompts = [""] * len(rows)
    answers = [split.answer(i) for i in safe] if self.with_answers else None
    batch = encode_texts(self.tokenizer, prompts, answers, self.layout)
    batch["image"] = np.where(codes == missing_lib.IMAGE_MISSING, -1, split.image_index[safe]).astype(np.int32)
    batch["valid"] = rows >= 0
    batch["row"] = rows.astype(np.int64)
    batch["question_type"] = split.question_type[safe]
    batch["code"] = codes.astype(np.int8)
    return batch


def train_batches(split: VQASplit, tokenizer, layout: Layout, batch_size: int, seed: int, *, process_index: int = 0,
                  process_count: int = 1, accum_steps: int = 1) -> grain.DatasetIterator:
  """This process's endless shuffled training micro-batches of `batch_size` rows (a new order each epoch, the last
  step of an epoch padded), its block of every global micro-batch as the classifier's `pipeline.index_batches`
  reads them; the iterator's get_state / set_state resume it."""
  indices = pipeline.index_batches(len(split), batch_size, train=True, seed=seed, process_index=process_index,
                                   process_count=process_count, accum_steps=accum_steps)
  return indices.map(Assemble(split, tokenizer, layout, with_answers=True)).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def eval_batches(split: VQASplit, tokenizer, layout: Layout, batch_size: int, limit: int = 0, *,
                 process_index: int = 0, process_count: int = 1):
  """This process's batches of one pass in order over the split (its first `limit` samples when > 0), prompts
  only, padded so that every process runs as many batches of `batch_size` rows."""
  n = min(len(split), limit) if limit else len(split)
  rows = pipeline.eval_indices(n, batch_size, process_index, process_count)
  assemble = Assemble(split, tokenizer, layout, with_answers=False)
  for start in range(0, len(rows), batch_size):
    yield assemble(rows[start:start + batch_size])
