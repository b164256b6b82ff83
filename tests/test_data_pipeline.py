"""The Grain pipeline: host sharding, exactly-once evaluation with padding, resumable state, dummy inputs."""

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from mora_jax.data import inputs, missing, pipeline, pixel_store, preprocess, tokenizers

PREP = pipeline.Preprocessing(image=preprocess.ImageProcessing.clip(32), max_length=16)


def make_source(n: int = 23):
  rng = np.random.RandomState(0)
  records = []
  for i in range(n):
    buffer = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (20 + i, 30, 3), np.uint8)).save(buffer, "PNG")
    records.append({"id": f"s{i}".encode(), "image": buffer.getvalue(), "text": f"the sample {i}".encode(),
                    "label": i % 3})
  return records


@pytest.fixture(name="tokenizer", scope="module")
def fixture_tokenizer(tmp_path_factory):
  return tokenizers.byte_level_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_two_hosts_see_disjoint_samples_covering_an_epoch(tokenizer):
  source = make_source(24)
  table = np.zeros(24, np.int8)
  seen = []
  for host in range(2):
    it = iter(pipeline.batches(source, table, tokenizer, 4, train=True, seed=5, prep=PREP, process_index=host,
                               process_count=2))
    seen.append(np.concatenate([b["index"] for b in take(it, 3)]))  # 3 x 4 = one epoch's half per host
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(24))


def test_epochs_are_reshuffled_and_seeded(tokenizer):
  source, table = make_source(12), np.zeros(12, np.int8)
  order = lambda seed: np.concatenate([b["index"] for b in take(iter(pipeline.batches(
      source, table, tokenizer, 4, train=True, seed=seed, prep=PREP)), 6)])
  a = order(1)
  assert sorted(a[:12]) == sorted(a[12:]) == list(range(12)) and not np.array_equal(a[:12], a[12:])
  assert np.array_equal(a, order(1)) and not np.array_equal(a, order(2))


@pytest.mark.parametrize("hosts, accum_steps", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_training_epochs_are_ceil_n_over_b_steps_with_the_last_padded(tokenizer, hosts, accum_steps):
  """23 samples, steps of 8 (hosts x accum_steps micro-batches): 3 steps an epoch, every sample once, the last
  step holding 7 real rows and one padding row, then the next epoch starts with a fresh shuffle."""
  n, step_size = 23, 8
  micro = step_size // (hosts * accum_steps)
  source, table = make_source(n), np.zeros(n, np.int8)
  per_host = [take(iter(pipeline.batches(source, table, tokenizer, micro, train=True, seed=3, prep=PREP,
                                         process_index=h, process_count=hosts, accum_steps=accum_steps)), 6 * accum_steps)
              for h in range(hosts)]
  def global_rows(key):  # micro-batch after micro-batch, each the concatenation of the hosts' blocks
    return np.concatenate([per_host[h][m][key] for m in range(6 * accum_steps) for h in range(hosts)])

  index, valid = global_rows("index"), global_rows("valid")
  for epoch in range(2):
    rows_of_epoch = slice(epoch * 24, (epoch + 1) * 24)
    assert sorted(index[rows_of_epoch][valid[rows_of_epoch]]) == list(range(n))
    assert valid[rows_of_epoch].tolist() == [True] * 23 + [False] and index[rows_of_epoch][-1] == -1
  assert not np.array_equal(index[:23], index[24:47])
  padding = per_host[-1][accum_steps * 3 - 1]  # the last host's part of epoch 1's last micro-batch
  assert padding["inputs"].pixels.shape == (micro, 32, 32, 3) and padding["label"].shape == (micro,)


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_evaluation_sees_every_sample_once(tokenizer, hosts):
  source, table = make_source(23), np.zeros(23, np.int8)
  counts = np.zeros(23, int)
  num_batches = set()
  for host in range(hosts):
    host_batches = list(pipeline.batches(source, table, tokenizer, 4, train=False, prep=PREP, process_index=host,
                                         process_count=hosts))
    num_batches.add(len(host_batches))
    for b in host_batches:
      pixels, input_ids = b["inputs"].pixels, b["inputs"].input_ids
      assert pixels.shape == (4, 32, 32, 3) and pixels.dtype == np.uint8 and input_ids.shape == (4, 16)
      np.add.at(counts, b["index"][b["valid"]], 1)
  assert len(num_batches) == 1  # every host runs the same number of steps
  assert (counts == 1).all()


def test_resume_from_saved_state_gives_the_same_batches(tokenizer):
  source, table = make_source(20), np.zeros(20, np.int8)
  make = lambda: iter(pipeline.batches(source, table, tokenizer, 3, train=True, seed=0, prep=PREP))
  straight = make()
  take(straight, 4)
  state = straight.get_state()
  expected = take(straight, 5)
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 5)):
    for key in ("index", "label"):
      np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["inputs"].pixels, b["inputs"].pixels)
    np.testing.assert_array_equal(a["inputs"].input_ids, b["inputs"].input_ids)


def test_missing_modalities_get_dummy_inputs(tokenizer):
  source = make_source(6)
  table = np.array([0, 1, 2, 0, 1, 2], np.int8)
  batch = next(iter(pipeline.batches(source, table, tokenizer, 6, train=False, prep=PREP)))
  white = preprocess.image_to_pixels(preprocess.white_image(32, 32), preprocess.ImageProcessing.clip(32))
  empty_ids, _ = pipeline.tokenize(tokenizer, [""], PREP)
  pixel_values = np.asarray(jax.jit(pipeline.normalize, static_argnums=1)(batch["inputs"], PREP).pixel_values)
  for row, code in enumerate(table):
    assert batch["inputs"].missing[row] == code
    assert np.array_equal(pixel_values[row], white) == (code == missing.IMAGE_MISSING)
    assert np.array_equal(batch["inputs"].input_ids[row], empty_ids[0]) == (code == missing.TEXT_MISSING)
  ones = dataclasses.replace(PREP, missing_image="ones_after_norm")
  batch = next(iter(pipeline.batches(source, table, tokenizer, 6, train=False, prep=ones)))
  pixel_values = np.asarray(jax.jit(pipeline.normalize, static_argnums=1)(batch["inputs"], ones).pixel_values)
  assert (pixel_values[[2, 5]] == 1).all() and not (pixel_values[[0, 1, 3, 4]] == 1).any()


def test_device_normalisation_equals_the_host_float_path_bit_for_bit():
  """Every uint8 value of every channel, through the normalisation the devices run, against the host path."""
  rng = np.random.RandomState(1)
  processing = [preprocess.ImageProcessing.clip(32), dataclasses.replace(
      preprocess.ImageProcessing.clip(32), mean=(0.5, 0.25, 0.1), std=(0.2, 0.3, 0.7), rescale_factor=1 / 127.5),
                dataclasses.replace(preprocess.ImageProcessing.clip(32), do_normalize=False, do_rescale=False)]
  images = rng.randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  images[0, :16, :16] = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)  # every value in every channel
  for image_processing in processing:
    prep = dataclasses.replace(PREP, image=image_processing)
    host = np.stack([preprocess.normalize(image, image_processing) for image in images])
    tokens = np.zeros((4, 16), np.int32)
    device = jax.jit(pipeline.normalize, static_argnums=1)(
        inputs.Decoded(images, tokens, tokens, np.zeros(4, np.int8)), prep).pixel_values
    assert device.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(device), host)


def test_decoding_workers_and_the_pixel_store_give_identical_batches(tokenizer, tmp_path):
  """The same batches (pixels, tokens, masks, missing codes, valid and corrupt rows) decoded in the main process,
  in 1 or 2 worker processes, or read from the pixel store, and after a resume from any of them."""
  source = make_source(13)
  source[4]["image"] = source[4]["image"][:40]  # corrupt: a masked, counted row on every path
  table = np.array([0, 1, 2] * 4 + [0], np.int8)
  store = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "on", 2, print)
  assert store.corrupt.tolist() == [i == 4 for i in range(13)]
  make = lambda **kw: iter(pipeline.batches(source, table, tokenizer, 4, train=True, seed=2, prep=PREP,
                                            skip_corrupt=True, **kw))
  reference = take(make(workers=0), 8)
  for options in (dict(workers=1), dict(workers=2), dict(store=store), dict(store=store, num_threads=3)):
    it = make(**options)
    got = take(it, 3)
    state = it.get_state()
    resumed = make(**options)
    resumed.set_state(state)
    for a, b in zip(reference, got + take(resumed, 5)):
      assert jax.tree.structure(a) == jax.tree.structure(b)
      for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{options} {jax.tree_util.keystr(path)}")
  assert any(b["corrupt"].any() for b in reference)


def test_a_truncated_pixel_store_is_detected_and_rebuilt(tmp_path):
  source = make_source(5)
  notes = []
  first = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "on", 0, notes.append)
  pixels_file = first.directory / "pixels.npy"
  expected = np.array(first.pixels)
  with open(pixels_file, "r+b") as f:
    f.truncate(pixels_file.stat().st_size - 100)
  again = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "on", 0, notes.append)
  assert any(f"pixel store file {pixels_file} is damaged" in note for note in notes)
  assert again.build_seconds > 0
  np.testing.assert_array_equal(np.asarray(again.pixels), expected)
  reused = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "on", 0, notes.append)
  assert reused.build_seconds == 0 and reused.directory == first.directory


def test_a_store_of_other_preprocessing_is_another_store(tmp_path):
  source = make_source(3)
  a = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "on", 0, print)
  other = dataclasses.replace(PREP, transparency="white")
  b = pixel_store.open_or_build(source, "fixture", "train", other, tmp_path, "on", 0, print)
  assert a.directory != b.directory and b.build_seconds > 0
  assert pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "off", 0, print) is None


def test_position_75_rewrite_only_touches_truncated_texts(tokenizer):
  prep = pipeline.Preprocessing()
  ids, _ = pipeline.tokenize(tokenizer, ["the cat", "x " * 200], prep)
  plain, _ = pipeline.tokenize(tokenizer, ["the cat", "x " * 200], pipeline.Preprocessing(rewrite_position_75=False))
  eos = tokenizer.eos_token_id
  assert np.array_equal(ids[0], plain[0])  # short text: position 75 is already pad == EOS
  assert plain[1, 75] != eos and ids[1, 75] == eos and ids[1, 76] == eos
  assert (ids[1] == eos).argmax() == 75  # pooling now reads position 75, as in the authors' runs


def test_corrupt_image_names_the_sample(tokenizer):
  source = make_source(4)
  source[2]["image"] = source[2]["image"][:40]
  with pytest.raises(ValueError, match="fixture sample s2: corrupt or truncated image"):
    list(pipeline.batches(source, np.zeros(4, np.int8), tokenizer, 2, train=False, prep=PREP,
                          source_name="fixture"))


def test_skip_corrupt_masks_and_counts_only_the_bad_sample(tokenizer):
  source = make_source(5)
  source[3]["image"] = source[3]["image"][:40]
  batches = list(pipeline.batches(source, np.zeros(5, np.int8), tokenizer, 2, train=False, prep=PREP,
                                  skip_corrupt=True))
  corrupt = np.concatenate([b["index"][b["corrupt"]] for b in batches])
  valid = np.concatenate([b["index"][b["valid"]] for b in batches])
  assert corrupt.tolist() == [3]
  assert sorted(valid.tolist()) == [0, 1, 2, 4]


def test_decoding_workers_run_from_a_script_without_a_main_guard(tmp_path):
  """Spawned workers would re-run such a script (and fail starting workers of their own); ours do not."""
  script = tmp_path / "no_guard.py"
  script.write_text("import numpy as np\nfrom mora_jax.data import pipeline, preprocess\n"
                    "prep = pipeline.Preprocessing(image=preprocess.ImageProcessing.clip(32))\n"
                    "out = pipeline.decode_arrays([(np.zeros((40, 40, 3), np.uint8), 'a')] * 4, prep, 2)\n"
                    "print('decoded', len(out), out[0].shape)\n")
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  proc = subprocess.run([sys.executable, "-W", "error::ResourceWarning", str(script)], capture_output=True,
                        text=True, timeout=120, env=env, check=False)
  assert proc.returncode == 0 and "decoded 4 (32, 32, 3)" in proc.stdout, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_auto_builds_a_store_only_for_images_read_more_than_once_and_reuses_any(tmp_path):
  source = make_source(3)
  assert pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "auto", 0, print, uses=1) is None
  assert not (tmp_path).exists() or not any(tmp_path.iterdir())
  built = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "auto", 0, print, uses=2)
  assert built is not None and built.build_seconds > 0
  reused = pixel_store.open_or_build(source, "fixture", "train", PREP, tmp_path, "auto", 0, print, uses=1)
  assert reused is not None and reused.build_seconds == 0 and reused.directory == built.directory
