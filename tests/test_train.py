"""train.py / eval.py end to end on small fixtures: sharding parity, multi-host, resume, checkpoints, errors.

Runs that need another device count or several processes are subprocesses of the real scripts; the
resume test runs the loop in this process so that SIGTERM arrives at an exact step.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from mora_jax import adapters
from mora_jax.train import checkpoint, config as config_lib, evaluation, loop
from tests.helpers import (CONFIG, ROOT, assert_one_line_error, final_state, memes_config, memes_overrides, run_script,
                           saved_test_results, train_losses, write_memes)


@pytest.fixture(scope="module")
def one_device_run(memes):
  """3 steps on 1 device (also prepares the dataset for the other runs)."""
  workdir = memes / "run_1dev"
  run_script("train.py", ["--config", CONFIG, "--workdir", workdir, *memes_overrides(memes, max_steps=3)])
  return workdir


@pytest.fixture(scope="module")
def eight_device_run(memes, one_device_run):
  workdir = memes / "run_8dev"
  run_script("train.py", ["--config", CONFIG, "--workdir", workdir, *memes_overrides(memes, max_steps=3)],
             devices=8)
  return workdir


# ---------------------------------------------------------------------------------------------- configs


def test_every_shipped_config_loads_and_names_its_adapter():
  files = sorted((ROOT / "configs").glob("*.py"))
  assert len(files) == 20  # 4 datasets x {mora, lora, dora, moka, linear}
  for path in files:
    config = config_lib.load(path)
    adapter = adapters.from_config(config.adapter.to_dict())
    assert path.stem.endswith(config.adapter.method) and adapters.to_config(adapter) == config.adapter.to_dict()


def test_published_recipes():
  food = config_lib.load(ROOT / "configs" / "food101_mora.py")
  assert (food.dataset, food.adapter.targets, food.adapter.rank, food.adapter.alpha, food.epochs, food.batch_size,
          food.optim.weight_decay, food.optim.lr, food.seed) == (
              "upmc_food101", ("q_proj", "v_proj"), 4, 0.01, 20, 256, 0.02, 1e-2, 42)
  memes = config_lib.load(ROOT / "configs" / "hateful_memes_mora.py")
  assert (memes.adapter.targets, memes.adapter.rank, memes.adapter.alpha, memes.epochs, memes.batch_size,
          memes.optim.weight_decay) == (("k_proj", "v_proj"), 8, 0.1, 5, 16, 0.1)
  imdb = config_lib.load(ROOT / "configs" / "mm_imdb_lora.py")
  assert (imdb.adapter.method, imdb.adapter.targets, imdb.adapter.rank) == ("lora", ("q_proj", "k_proj"), 4)
  moka = config_lib.load(ROOT / "configs" / "mm_imdb_moka.py")
  assert (moka.adapter.targets, moka.adapter.rank, moka.adapter.alpha, moka.adapter.lam,
          moka.adapter.temperature, moka.adapter.scale_placement) == (
              ("q_proj", "k_proj"), 4, 16.0, 0.05, "sqrt_rank", "after_b")
  default = config_lib.load(ROOT / "configs" / "easy_vqa_mora.py")
  assert (default.backbone.path, default.preprocessing.max_length, default.head.type) == ("embedded", 24, "linear")


def test_overrides_keep_types_and_unknown_keys_are_named():
  config = config_lib.load(ROOT / "configs" / "food101_mora.py")
  config_lib.apply_overrides(config, [("optim.lr", "5e-3"), ("adapter.targets", "k_proj,v_proj"), ("epochs", "3"),
                                      ("optim.lr_mults.head", "0")])
  assert (config.optim.lr, config.adapter.targets, config.epochs, config.optim.lr_mults["head"]) == (
      5e-3, ("k_proj", "v_proj"), 3, 0.0)
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean optim.lr\?"):
    config_lib.override(config, "optim.lrr", "1")
  with pytest.raises(config_lib.ConfigError, match=r"config key epochs: 'many' does not fit its type int"):
    config_lib.override(config, "epochs", "many")
  assert config_lib.from_json(config_lib.to_json(config)).to_dict() == config.to_dict()


def test_lr_schedule_warms_up_then_decays_to_zero():
  from mora_jax.train import step  # pylint: disable=import-outside-toplevel
  schedule = step.lr_schedule(1e-2, 100, 0.1)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-2)
  assert float(schedule(5)) == pytest.approx(5e-3) and float(schedule(55)) == pytest.approx(5e-3)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------- sharding


def test_eight_devices_and_fsdp_give_the_one_device_losses(memes, one_device_run, eight_device_run):
  fsdp = memes / "run_fsdp"
  run_script("train.py", ["--config", CONFIG, "--workdir", fsdp,
                          *memes_overrides(memes, max_steps=3, **{"mesh.fsdp": 4})], devices=8)
  reference = train_losses(one_device_run)
  assert len(reference) == 3
  np.testing.assert_allclose(train_losses(eight_device_run), reference, atol=1e-5, rtol=0)
  np.testing.assert_allclose(train_losses(fsdp), reference, atol=1e-5, rtol=0)
  assert json.loads((fsdp / "config.json").read_text())["mesh"] == {"data": -1, "fsdp": 4}


def test_checkpoint_from_8_devices_evaluates_the_same_on_2(eight_device_run):
  out = eight_device_run / "on2.json"
  run_script("eval.py", ["--workdir", eight_device_run, "--output", out], devices=2)
  assert json.loads(out.read_text())["test"] == saved_test_results(eight_device_run)


def test_eval_reproduces_the_test_numbers_and_exports_for_transformers(one_device_run):
  out, export = one_device_run / "again.json", one_device_run / "hf"
  run_script("eval.py", ["--workdir", one_device_run, "--output", out, "--export_hf", export])
  assert json.loads(out.read_text())["test"] == saved_test_results(one_device_run)
  assert {"config.json", "model.safetensors", "head.safetensors", "head.json"} <= {p.name for p in export.iterdir()}
  transformers = pytest.importorskip("transformers")
  assert transformers.CLIPTokenizer.from_pretrained(export)("a meme")["input_ids"][-1] == 515  # byte-level EOS
  pytest.importorskip("torch")
  model = transformers.CLIPModel.from_pretrained(export)
  assert model.config.text_config.hidden_size == 32


# ------------------------------------------------------------------------------------------- multi-host


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(memes, one_device_run):
  reference = memes / "run_1x4"
  run_script("train.py", ["--config", CONFIG, "--workdir", reference, *memes_overrides(memes, max_steps=3)],
             devices=4)
  workdir, port = memes / "run_2x2", _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", CONFIG, "--workdir", str(workdir),
                             *memes_overrides(memes, max_steps=3), "--coordinator_address", f"127.0.0.1:{port}",
                             "--num_processes", "2", "--process_id", str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  np.testing.assert_allclose(train_losses(workdir), train_losses(reference), atol=1e-5, rtol=0)
  out = workdir / "in_one.json"
  run_script("eval.py", ["--workdir", workdir, "--output", out], devices=4)
  assert json.loads(out.read_text())["test"] == saved_test_results(workdir)


# --------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def straight_run(memes, one_device_run):
  """6 steps without interruption, in this process (8 devices)."""
  workdir = memes / "straight"
  loop.train(memes_config(memes, {"max_steps": 6}), workdir)
  return workdir


def test_sigterm_then_resume_equals_a_straight_run_bitwise(memes, straight_run):
  config = memes_config(memes, {"max_steps": 6})
  resumed = memes / "resumed"

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.Preempted, match="saved a checkpoint at step 3"):
    loop.train(config, resumed, step_hook=preempt)
  assert checkpoint.Checkpointer(resumed / "checkpoints", read_only=True).all_steps() == [3]
  loop.train(config, resumed)
  assert train_losses(resumed) == train_losses(straight_run)
  (step_a, a), (step_b, b) = final_state(straight_run), final_state(resumed)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert saved_test_results(resumed) == saved_test_results(straight_run)


def test_sigkill_mid_save_resumes_from_the_last_complete_checkpoint(memes, straight_run):
  """Killed right after the asynchronous save of step 4 starts; resuming (from step 3 or 4, whichever was
  complete) ends with the parameters of the uninterrupted run (to 1e-6: the two runs are separate processes,
  the straight one under the test session's jax flags)."""
  workdir = memes / "killed"
  flags = memes_overrides(memes, max_steps=6, **{"checkpoint.every_steps": 1})
  script = ("import os, signal, sys; sys.argv = sys.argv[:1] + sys.argv[2:]; import train; "
            "from mora_jax.train import loop; original = loop.train; "
            "hook = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == 4 else None; "
            "loop.train = lambda *a, **k: original(*a, step_hook=hook, **k); train.main()")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", script, "-", "--config", CONFIG, "--workdir", str(workdir), *flags],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  resumed = run_script("train.py", ["--config", CONFIG, "--workdir", workdir, *flags], devices=8)
  assert "resumed from" in resumed.stdout + resumed.stderr
  (_, a), (_, b) = final_state(workdir), final_state(straight_run)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), a, b)


# ------------------------------------------------------------------------------------------- bad input


def test_unknown_config_key_is_one_clear_error(tmp_path):
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", tmp_path, "--config.optim.lrr=1"], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "unknown config key 'optim.lrr'", "Did you mean optim.lr?")


def test_missing_data_dir_is_one_clear_error(memes, tmp_path):
  missing = tmp_path / "nowhere"
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", tmp_path / "w",
                                 *memes_overrides(memes, manual_dir=missing)], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, str(missing), "MANUAL_DOWNLOAD_INSTRUCTIONS")
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", tmp_path / "w",
                                 *memes_overrides(memes, manual_dir="", data_dir=missing)], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "MANUAL_DOWNLOAD_INSTRUCTIONS")


def test_checkpoint_of_another_method_is_refused(memes, one_device_run):
  workdir = memes / "lora"
  run_script("train.py", ["--config", ROOT / "configs" / "hateful_memes_lora.py", "--workdir", workdir,
                          *memes_overrides(memes, max_steps=1)])
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", workdir, *memes_overrides(memes, max_steps=1)],
                    check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "another config", "adapter.method: 'lora' -> 'mora'",
                        "new --workdir")


def test_food101_mora_checkpoint_holds_only_trainables_and_two_adam_moments(tmp_path):
  """The published Food-101 MoRA recipe on ViT-B/16 widths: 164,965 trainable values (MORA.md: ~0.11%)."""
  from tests.helpers import write_food101  # pylint: disable=import-outside-toplevel
  write_food101(tmp_path / "raw")
  workdir = tmp_path / "run"
  flags = {"data_dir": tmp_path / "data", "manual_dir": tmp_path / "raw", "backbone.path": "",
           "backbone.random_preset": "ViT-B/16", "preprocessing.max_length": 16, "batch_size": 8,
           "eval.batch_size": 8, "max_steps": 1, "data_threads": 1}
  run_script("train.py", ["--config", ROOT / "configs" / "food101_mora.py", "--workdir", workdir,
                          *[f"--config.{k}={v}" for k, v in flags.items()]], timeout=600)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", read_only=True)
  tree = ckpt.manager.item_metadata(ckpt.latest_step())["state"].tree
  leaves = {jax.tree_util.keystr(p): m.shape for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  params = {k: shape for k, shape in leaves.items() if k.startswith("['params']")}
  moments = {k: shape for k, shape in leaves.items() if "['mu']" in k or "['nu']" in k}
  size = lambda group: sum(int(np.prod(shape)) for shape in group.values())
  assert size(params) == 164_965
  assert size(moments) == 2 * 164_965
  # Every parameter is an adapter factor/magnitude or the head (no frozen kernel, bias or embedding) ...
  assert all(k.startswith(("['params']['adapter']", "['params']['head']")) for k in params)
  assert not [k for k in params if "['head']" not in k and any(f"['{w}']" in k for w in ("kernel", "bias"))]
  # ... and besides the moments the optimizer holds one step counter per partition; then step and RNG key.
  others = {k: shape for k, shape in leaves.items() if k not in params and k not in moments}
  assert all(k.endswith("['count']") and shape == () for k, shape in others.items() if k.startswith("['opt']"))
  assert {k for k in others if not k.startswith("['opt']")} == {"['step']", "['rng']"}
  stored = sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*") if f.is_file())
  assert stored < 10 * 4 * 3 * 164_965  # parameters + 2 moments in float32, with room for metadata; no backbone
  ckpt.close()


def test_checkpointer_keeps_the_latest_and_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, metric="accuracy")
  iterator = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  for step, accuracy in enumerate([0.5, 0.9, 0.6, 0.7], start=1):
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
  again.close()


def test_a_checkpoint_over_other_backbone_weights_is_refused():
  meta = {"backbone": {"source": "openai/clip-vit-base-patch16", "sha256": "a" * 64}}
  checkpoint.check_backbone(meta, {"source": "elsewhere", "sha256": "a" * 64}, "runs/x")
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"another backbone: openai/clip-vit-base-patch16 "
                     r"\(weights sha256 aaaaaaaaaaaa\), but local/dir \(sha256 bbbbbbbbbbbb\)"):
    checkpoint.check_backbone(meta, {"source": "local/dir", "sha256": "b" * 64}, "runs/x")


def test_bfloat16_backbone_step_tracks_float32():
  """Mixed precision: a bfloat16 frozen backbone (adapters, head and AdamW in float32) gives the float32
  loss to bfloat16 rounding (2e-2 relative), and the trainable state stays float32."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mora_jax import adapters, clip, sharding  # pylint: disable=import-outside-toplevel
  from mora_jax.adapters import optim  # pylint: disable=import-outside-toplevel
  from mora_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import random_inputs, tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  pixels, ids, mask = random_inputs(cfg, batch=8, length=12)
  mesh = sharding.make_mesh((jax.device_count(), 1), ("data", "fsdp"))
  batch = {"pixel_values": pixels[None], "input_ids": ids[None].astype(np.int32),
           "attention_mask": mask[None].astype(np.int32), "label": np.arange(8, dtype=np.int32)[None] % 3,
           "valid": np.ones((1, 8), bool)}
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    clf = adapters.build_classifier(clip.init(cfg, seed=0, dtype=dtype), adapters.MoRAConfig(start_layer=1), 3)
    graphdef, params = adapters.split(clf)
    schedule = step_lib.lr_schedule(1e-2, 10, 0.1)
    tx = optim.adamw(schedule, 0.02)
    trainable = adapters.trainable(params)
    state = sharding.replicate({"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0),
                                "rng": jax.random.PRNGKey(0)}, mesh)
    train_step = step_lib.make_train_step(graphdef, tx, schedule, False, mesh, sharding.state_shardings(
        params["backbone"], mesh, sharding.REPLICATED_RULES))
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh, micro_axis=True))
    state, metrics = train_step(state, params["backbone"], global_batch)
    losses[dtype] = float(metrics["loss"])
    assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)


def test_corrupt_images_are_skipped_and_counted_when_asked(tmp_path):
  write_memes(tmp_path / "raw", sizes=(("train", 32), ("dev", 8), ("test", 8)))
  for meme in (5, 41):  # one train sample, one test sample
    (tmp_path / "raw" / "img" / f"{meme:05d}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  config = config_lib.load(CONFIG)
  config_lib.apply_overrides(config, [tuple(flag[len("--config."):].split("=", 1)) for flag in memes_overrides(
      tmp_path, epochs=1, skip_corrupt=True, **{"missing.rate": 0.0})])
  results = loop.train(config, tmp_path / "run")
  assert results["corrupt_skipped_in_training"] == 1
  counts = {kind: r["corrupt_skipped"] for kind, r in results["test"].items()}
  assert counts == {"complete": 1, "text_missing": 1, "image_missing": 0, "mix": 1}
  assert results["test"]["complete"]["samples"] == 7 and results["test"]["image_missing"]["samples"] == 8


def test_moka_trains_and_is_tested_unmerged_and_reproducibly(memes, one_device_run):
  config = config_lib.load(ROOT / "configs" / "hateful_memes_moka.py")
  config_lib.apply_overrides(config, [tuple(flag[len("--config."):].split("=", 1)) for flag in
                                      memes_overrides(memes, max_steps=2, **{"head.type": "mlp"})])
  workdir = memes / "moka"
  results = loop.train(config, workdir)
  assert results["method"] == "moka" and results["merged"] is False
  assert all(np.isfinite(loss) for loss in train_losses(workdir))
  again = evaluation.evaluate_run(workdir)
  assert again["merged"] is False and again["test"] == results["test"]
