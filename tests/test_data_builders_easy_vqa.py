"""The easy-VQA TFDS builder over the data in the easy-vqa wheel (builds in a few seconds, no download)."""

import collections
import pathlib

import numpy as np
import pytest

from mora_jax.data import pipeline
from mora_jax.data.builders import easy_vqa


@pytest.fixture(name="builder", scope="module")
def fixture_builder(easy_vqa_data):
  builder = easy_vqa.EasyVqa(data_dir=str(easy_vqa_data))
  builder.download_and_prepare(file_format="array_record")  # prepared by the fixture: reused
  return builder


def test_split_sizes_and_classes(builder):
  sizes = {s: len(builder.as_data_source(s)) for s in ("train", "validation", "test")}
  assert sizes["train"] + sizes["validation"] == 38_575
  assert sizes["test"] == 9_673
  assert builder.info.features["label"].num_classes == 13


def test_validation_is_carved_by_image(builder):
  image_ids = {}
  for split in ("train", "validation", "test"):
    source = builder.as_data_source(split)
    image_ids[split] = {int(source[i]["image_id"]) for i in range(len(source))}
  assert not image_ids["train"] & image_ids["validation"]
  assert len(image_ids["train"] | image_ids["validation"]) == 4_000
  assert len(image_ids["validation"]) == 400
  assert len(image_ids["test"]) == 1_000


def test_records_and_question_types(builder):
  source = builder.as_data_source("test")
  names = builder.info.features["label"].names
  types = builder.info.features["question_type"].names
  counts = collections.Counter()
  for i in range(0, len(source), 97):
    record = source[i]
    assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
    answer = names[record["label"]]
    assert types[record["question_type"]] == easy_vqa.question_type(answer)
    counts[types[record["question_type"]]] += 1
  assert set(counts) == {"yes/no", "color", "shape"}
  assert counts["yes/no"] > counts["color"]  # 74% of easy-VQA questions are yes/no (docs/protocol.md)


def test_rebuilding_reuses_the_prepared_files(builder):
  def stamps(directory):
    return {p.name: p.stat().st_mtime_ns for p in pathlib.Path(str(directory)).iterdir()}

  before = stamps(builder.data_path)
  again = easy_vqa.EasyVqa(data_dir=str(builder.data_path.parent.parent))
  again.download_and_prepare(file_format="array_record")
  assert stamps(again.data_path) == before


def test_load_with_missing_table_and_scenarios(builder):
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  data_dir = builder.data_path.parent.parent
  ds = data.load("easy_vqa", "test", data_dir, missing=data.Missing(rate=0.7, type="both", seed=42))
  assert len(ds.source) == len(ds.table) == 9_673 and not ds.multi_label and ds.num_classes == 13
  assert int((ds.table != 0).sum()) == int(9_673 * 0.7)
  again = data.load("easy_vqa", "test", data_dir, missing=data.Missing(rate=0.7, type="both", seed=42))
  assert np.array_equal(ds.table, again.table)
  assert set(ds.scenario("text_missing").table.tolist()) == {1} and ds.scenario("mix") is ds
  record = ds.source[0]
  assert isinstance(record["image"], bytes) and isinstance(record["text"], bytes)  # decoded by the pipeline
  assert np.asarray(pipeline.record_image(record, "easy_vqa")).shape == (64, 64, 3)


def test_batches_at_224_pixels(builder, tmp_path):
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  from mora_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  ds = data.load("easy_vqa", "validation", builder.data_path.parent.parent, missing=data.Missing(rate=0.7))
  tokenizer = tokenizers.byte_level_clip_tokenizer(tmp_path)
  batch = next(iter(data.batches(ds, 4, tokenizer, train=True, seed=42)))
  inputs = batch["inputs"]
  assert inputs.pixels.shape == (4, 224, 224, 3) and inputs.pixels.dtype == np.uint8
  assert inputs.input_ids.shape == (4, 77) and batch["label"].shape == (4,)
  np.testing.assert_array_equal(inputs.missing, ds.table[batch["index"]])
