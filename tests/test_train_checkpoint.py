"""Orbax checkpoints: what they hold, which they keep, and which they refuse to restore."""

import json
import shutil

import grain
import jax
import numpy as np
import pytest

from mora_jax.train import checkpoint, cli, recipes
from mora_jax.train import config as config_lib
from tests.helpers import CONFIG, ROOT, assert_one_line_error, memes_overrides, two_processes


def test_food101_mora_checkpoint_holds_only_trainables_and_two_adam_moments(tmp_path):
  """The Food-101 MoRA recipe (q, v; r = 4; 101 classes) on the tiny preset's widths (32 per tower, projection
  16), adapting both of its layers: every trainable value and its two Adam moments, nothing of the backbone. On
  ViT-B/16 the recipe's count is the published 164,965 (test_adapters_mora.test_published_trainable_counts)."""
  from tests.helpers import write_food101  # pylint: disable=import-outside-toplevel
  write_food101(tmp_path / "raw")
  workdir = tmp_path / "run"
  flags = {"data_dir": tmp_path / "data", "manual_dir": tmp_path / "raw", "backbone.path": "",
           "backbone.random_preset": "tiny", "adapter.start_layer": 0, "preprocessing.max_length": 16,
           "batch_size": 8, "eval.batch_size": 8, "max_steps": 1, "data_threads": 1}
  assert cli.train_main(["--config", str(ROOT / "configs" / "food101_mora.py"), "--workdir", str(workdir),
                         *[f"--config.{k}={v}" for k, v in flags.items()]]) == 0
  # Per layer: common (32 + 32) r; per projection: vision and text 2 * 32 r + 2 * 32; the head (16 + 16 + 1) x 101.
  trainable = 2 * ((32 + 32) * 4 + 2 * 2 * (2 * 32 * 4 + 2 * 32)) + (16 + 16 + 1) * 101
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True)
  tree = ckpt.manager.item_metadata(ckpt.latest_step())["state"].tree
  leaves = {jax.tree_util.keystr(p): m.shape for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  params = {k: shape for k, shape in leaves.items() if k.startswith("['params']")}
  moments = {k: shape for k, shape in leaves.items() if "['mu']" in k or "['nu']" in k}
  size = lambda group: sum(int(np.prod(shape)) for shape in group.values())
  assert size(params) == trainable
  assert size(moments) == 2 * trainable
  # Every parameter is an adapter factor/magnitude or the head (no frozen kernel, bias or embedding) ...
  assert all(k.startswith(("['params']['adapter']", "['params']['head']")) for k in params)
  assert not [k for k in params if "['head']" not in k and any(f"['{w}']" in k for w in ("kernel", "bias"))]
  # ... and besides the moments the optimizer holds one step counter per partition; then step and RNG key.
  others = {k: shape for k, shape in leaves.items() if k not in params and k not in moments}
  assert all(k.endswith("['count']") and shape == () for k, shape in others.items() if k.startswith("['opt']"))
  assert {k for k in others if not k.startswith("['opt']")} == {"['step']", "['rng']"}
  ckpt.close()


def test_checkpointer_keeps_the_latest_and_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, metric="accuracy")
  iterator = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  for step, accuracy in enumerate([0.5, 0.9, 0.9, 0.7], start=1):  # of equal values the earlier is the best
    ckpt.save(step, {"w": np.full(2, step, np.float32)}, iterator, {"step": step}, metrics={"accuracy": accuracy})
  ckpt.save(5, {"w": np.zeros(2, np.float32)}, iterator, {"step": 5})  # mid-epoch (SIGTERM), no metric
  ckpt.wait()
  assert ckpt.all_steps() == [2, 5]
  ckpt.close()
  # After a restart the best is still known (its metric is stored with it), ranked first and kept.
  again = checkpoint.Checkpointer(tmp_path, keep=1, metric="accuracy")
  assert again.steps_best_first("accuracy", best_step=None) == [2, 5]
  again.save(6, {"w": np.zeros(2, np.float32)}, iterator, {"step": 6})
  again.save(6, {"w": np.ones(2, np.float32)}, iterator, {"step": 6})  # already saved: kept as it is
  again.wait()
  assert again.all_steps() == [2, 6] and again.steps_best_first("accuracy", best_step=6) == [6, 2]
  np.testing.assert_array_equal(
      again.restore_state(6, {"w": jax.ShapeDtypeStruct((2,), np.float32)})["w"], np.zeros(2, np.float32))
  # The iterator's position restores in a run of the same process count; one saved by 2 processes does not (the
  # loop then repositions from the step).
  resumed = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  assert again.restore_data(6, resumed)
  saved = tmp_path / "6" / "data" / "process_0-of-1.json"
  saved.rename(saved.with_name("process_0-of-2.json"))
  assert not again.restore_data(6, resumed)
  again.close()


def test_a_checkpoint_saved_before_a_key_was_added_resumes_with_its_default():
  """Keys the library added later (prefix_cache_dtype, optim.decay) take their defaults in an older checkpoint's
  config; a changed value is still refused."""
  config = recipes.get("hateful_memes", "mora")
  old = json.loads(config_lib.to_json(config))
  del old["prefix_cache_dtype"], old["optim"]["decay"]
  checkpoint.check_config({"config": old}, config, "runs/x")
  assert checkpoint.saved_config({"config": old})["optim"]["decay"] == config.optim.decay
  config_lib.override(config, "prefix_cache_dtype", "bfloat16")
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="prefix_cache_dtype: 'auto' -> 'bfloat16'"):
    checkpoint.check_config({"config": old}, config, "runs/x")


def test_an_adapter_field_added_since_a_checkpoint_takes_the_value_it_ran_with():
  """MokA's decoder_masks came after runs that saved MokA checkpoints. A CLIP run's resumes (the field is not read
  there: it takes the default); an MLLM run's ran every layer's masks: it resumes with that value, and the new
  default is refused, naming the difference."""
  clip = recipes.get("hateful_memes", "moka")
  old = json.loads(config_lib.to_json(clip))
  del old["adapter"]["decoder_masks"]
  checkpoint.check_config({"config": old}, clip, "runs/x")
  mllm = recipes.mllm("moka")
  old = json.loads(config_lib.to_json(mllm))
  del old["adapter"]["decoder_masks"]
  assert checkpoint.saved_config({"config": old})["adapter"]["decoder_masks"] == "every_layer"
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="adapter.decoder_masks: 'every_layer' -> 'first_layer'"):
    checkpoint.check_config({"config": old}, mllm, "runs/x")
  config_lib.override(mllm, "adapter.decoder_masks", "every_layer")
  checkpoint.check_config({"config": old}, mllm, "runs/x")


def test_mllm_keys_added_since_a_checkpoint_take_the_values_it_ran_with():
  """image_tokens and stage1.data came after the first MLLM runs: an older run's config reads "patches" and
  "captions" (what it computed), whatever the recipe's defaults become."""
  mllm = recipes.mllm("moka")
  old = json.loads(config_lib.to_json(mllm))
  del old["image_tokens"], old["stage1"]["data"]
  saved = checkpoint.saved_config({"config": old})
  assert saved["image_tokens"] == "patches" and saved["stage1"]["data"] == "captions"
  assert saved["stage1"]["steps"] == mllm.stage1.steps
  config_lib.override(mllm, "stage1.data", "questions")
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="stage1.data: 'captions' -> 'questions'"):
    checkpoint.check_config({"config": old}, mllm, "runs/x")


def test_a_checkpoint_over_other_backbone_weights_is_refused():
  meta = {"backbone": {"source": "openai/clip-vit-base-patch16", "sha256": "a" * 64}}
  checkpoint.check_backbone(meta, {"source": "elsewhere", "sha256": "a" * 64}, "runs/x")
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"another backbone: openai/clip-vit-base-patch16 "
                     r"\(weights sha256 aaaaaaaaaaaa\), but local/dir \(sha256 bbbbbbbbbbbb\)"):
    checkpoint.check_backbone(meta, {"source": "local/dir", "sha256": "b" * 64}, "runs/x")


def test_checkpoint_of_another_method_is_refused(memes, one_device_run, capsys):
  """The LoRA recipe on a copy of the MoRA run's folder (same flags): refused before any work, nothing changed."""
  workdir = memes / "lora_on_mora"
  shutil.copytree(one_device_run, workdir)
  before = sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*"))
  capsys.readouterr()
  code = cli.train_main(["--config", str(ROOT / "configs" / "hateful_memes_lora.py"), "--workdir", str(workdir),
                         *memes_overrides(memes, max_steps=3)])
  assert_one_line_error(capsys.readouterr().err, code, "another config", "adapter.method: 'mora' -> 'lora'",
                        "new --workdir")
  assert sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


# Two processes save steps 1-3 into one folder; process 1 alone cannot restore step 3 (a damaged file as it sees
# it), then neither step 3 nor 2. Each prints the step it restored and the value, or the error it raised.
AGREEING_PROCESSES = """
import argparse, sys
import grain, jax, numpy as np
parser = argparse.ArgumentParser()
for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id"):
  parser.add_argument(flag)
args = parser.parse_args(sys.argv[2:])  # argv[1] is "-", the program read from the command line
jax.distributed.initialize(args.coordinator_address, int(args.num_processes), int(args.process_id))
from mora_jax.train import checkpoint
ckpt = checkpoint.Checkpointer(args.workdir, keep=3)
iterator = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
for step in (1, 2, 3):
  ckpt.save(step, {"w": np.full(2, step, np.float32)}, iterator, {"step": step})
ckpt.wait()
replicated = jax.sharding.NamedSharding(jax.make_mesh((4,), ("data",)), jax.sharding.PartitionSpec())
target = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=replicated)}

def restore_unless(unreadable):
  def restore(step):
    if jax.process_index() == 1 and step in unreadable:
      raise OSError(f"{args.workdir}/{step}/state/damaged is unreadable")
    return ckpt.restore_state(step, target)
  return restore

step, state = ckpt.restore_first_intact([3, 2, 1], restore_unless({3}), move_damaged=True, log=print)
print("restored", step, np.asarray(state["w"].addressable_data(0)).tolist())
try:
  ckpt.first_intact([2, 1], restore_unless({2, 1}))
except checkpoint.NoIntactCheckpoint as e:
  print("refused:", e)
ckpt.close()
"""


def test_processes_agree_on_the_checkpoint_to_restore(tmp_path):
  """A checkpoint one process cannot restore makes every process fall back to the same earlier one (moved aside
  once); when none restores on one process, all refuse together: never a hang or a split restore."""
  outputs = two_processes(CONFIG, tmp_path, [], AGREEING_PROCESSES)
  for status, log in outputs:
    assert status == 0, log[-3000:]
    assert "restored 2 [2.0, 2.0]" in log and "; step 1: " in log.split("refused:")[1], log[-3000:]
  first, second = outputs[0][1], outputs[1][1]
  assert "3 does not restore (RuntimeError: it failed to restore on another process); moved it to" in first, first
  assert "3 does not restore (" + str(tmp_path / "3" / "state" / "damaged") + "); moved it to" in second, second
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "damaged"]
  assert [p.name for p in (tmp_path / "damaged").iterdir()] == ["3"]
