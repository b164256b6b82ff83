"""Config files, the published recipes and command-line overrides."""

import base64
import itertools
import json
import re
import types

import jax.numpy as jnp
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.train import config as config_lib
from mora_jax.train import cli, job, loop, recipes, tasks
from tests.helpers import ROOT


def test_every_shipped_config_loads_and_names_its_adapter():
  files = sorted((ROOT / "configs").glob("*.py"))
  mllm = [path for path in files if "_mllm_" in path.stem]
  classifiers = [path for path in files if path not in mllm]
  # 4 datasets x {mora, lora, dora, moka, linear, mmp, dcp}; the multimodal LLM's moka, lora and moka_lambda0
  assert len(classifiers) == 28 and len(mllm) == 3
  for path in classifiers:
    config = config_lib.load(path)
    adapter = adapters.from_config(config.adapter.to_dict())
    assert path.stem.endswith(config.adapter.method) and adapters.to_config(adapter) == config.adapter.to_dict()
  for path in mllm:
    config = config_lib.load(path)
    assert config.task == "mllm" and path.stem.split("_mllm_")[1].startswith(config.adapter.method)


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


def classifier_config(tmp_path, overrides=()):
  """The embedded easy-VQA MoRA recipe with `overrides` ((key, text) pairs), its data under tmp_path."""
  config = recipes.get("easy_vqa", "mora")
  config_lib.apply_overrides(config, [("data_dir", str(tmp_path / "data")), *overrides])
  return config


def mllm_config(tmp_path, overrides=()):
  """The MLLM's MokA recipe with `overrides`, its data and model caches under tmp_path."""
  config = recipes.mllm("moka")
  config_lib.apply_overrides(config, [("data_dir", str(tmp_path / "data")), ("backbone.cache_dir", str(tmp_path)),
                                      ("lm.cache_dir", str(tmp_path)), *overrides])
  return config


# Per family, each override (space-separated ones together) and what its error says. Each is refused before the
# workdir is made: by job.validate (the classifier) or by answering.build's first checks (the MLLM).
BAD_VALUES = {
    "classifier": {
        "optim.lr=-0.01": "config.optim.lr=-0.01: must be a finite number > 0",
        "optim.lr=1e999": "config.optim.lr=inf: must be a finite number > 0",
        "optim.weight_decay=-1": "config.optim.weight_decay=-1.0: must be a finite number >= 0",
        "optim.b1=1.5": "config.optim.b1=1.5: must be a number in [0, 1)",
        "optim.b2=1": "config.optim.b2=1.0: must be a number in [0, 1)",
        "optim.eps=0": "config.optim.eps=0.0: must be a finite number > 0",
        "optim.warmup_fraction=1.5": "config.optim.warmup_fraction=1.5: must be a fraction in [0, 1]",
        "optim.decay=linearr": "config.optim.decay='linearr': use one of ('cosine', 'linear')",
        "optim.lr_mults.head=-1": "config.optim.lr_mults.head=-1.0: must be a finite number >= 0",
        "optim.wd_mults.adapter/common=1e999": "config.optim.wd_mults.adapter/common=inf",
        "preprocessing.max_length=0": "config.preprocessing.max_length=0: must be an integer >= 1",
        "head.type=mlp head.hidden=0": "config.head.hidden=0: must be an integer >= 1",
        "preprocessing.missing_image=black": "config.preprocessing: missing_image='black'",
        "preprocessing.transparency=alpha": "config.preprocessing: transparency='alpha'",
        "manifest.seed=-1": "config.manifest.seed=-1: must be an integer >= 0",
        "missing.seed=-1": "config.missing.seed=-1: must be an integer >= 0",
    },
    "mllm": {
        "stage1.lr=0": "config.stage1.lr=0.0: must be a finite number > 0",
        "stage2.lr=1e999": "config.stage2.lr=inf: must be a finite number > 0",
        "stage2.weight_decay=-0.1": "config.stage2.weight_decay=-0.1: must be a finite number >= 0",
        "stage2.warmup_fraction=2": "config.stage2.warmup_fraction=2.0: must be a fraction in [0, 1]",
        "missing.seed=-1": "config.missing.seed=-1: must be an integer >= 0",
    },
}
CONFIGS = {"classifier": classifier_config, "mllm": mllm_config}


@pytest.mark.parametrize("family,overrides", [(f, o) for f, cases in BAD_VALUES.items() for o in cases])
def test_a_bad_value_is_refused_naming_its_key_before_any_work(tmp_path, family, overrides):
  config = CONFIGS[family](tmp_path, [tuple(o.split("=", 1)) for o in overrides.split()])
  with pytest.raises(ValueError, match=re.escape(BAD_VALUES[family][overrides])):
    tasks.build(config, tmp_path / "w")
  assert not (tmp_path / "w").exists() and not (tmp_path / "data").exists()


def test_a_manifest_metric_is_checked_before_the_manifest_is_prepared(tmp_path):
  rows = [{"text": "a square", "label": colour, "image_base64": base64.b64encode(b"unread").decode(), "split": split}
          for colour, split in (("red", "train"), ("green", "train"), ("blue", "train"), ("red", "validation"),
                                ("red", "test"))]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  config = classifier_config(tmp_path, [("dataset", "manifest"), ("manifest.path", str(tmp_path / "m.jsonl")),
                                        ("manifest.metric", "auroc")])
  with pytest.raises(ValueError, match=r"manifest.metric='auroc' is not measured .*3 classes"):
    job.validate(config)
  assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("family", ["classifier", "mllm"])
def test_an_embedded_models_cache_dir_that_cannot_be_written_is_refused_before_pre_training(tmp_path, family):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  key = "backbone" if family == "classifier" else "lm"
  # seed 7: a model no cache holds, which the run would pre-train
  overrides = [(f"{key}.cache_dir", str(blocker)), (f"{key}.seed", "7")]
  config = CONFIGS[family](tmp_path, overrides)
  with pytest.raises(job.NotWritable, match=f"pass another --config.{key}.cache_dir"):
    tasks.build(config, tmp_path / "w")
  assert not (tmp_path / "data" / "easy_vqa").exists()  # refused before the data is prepared


def test_max_length_beyond_the_backbones_text_tower_is_refused(tmp_path):
  tiny = clip.preset("tiny")
  positions = tiny.text.max_position_embeddings
  backbone = types.SimpleNamespace(model=types.SimpleNamespace(config=tiny))
  config = classifier_config(tmp_path, [("preprocessing.max_length", str(positions + 1))])
  with pytest.raises(ValueError, match=f"--config.preprocessing.max_length={positions + 1} is more than the "
                                       f"{positions} tokens .* use at most {positions}"):
    job.check_max_length(config, backbone)
  config_lib.apply_overrides(config, [("backbone.path", ""), ("backbone.random_preset", "tiny")])
  job.check_max_length(config, backbone)  # a random preset's text tower is made max_length long


@pytest.mark.parametrize("key,samples", [("batch_size", 100), ("stage1.batch_size", 3)])
def test_a_batch_larger_than_the_train_split_is_refused(key, samples):
  job.check_batch_size(key, samples, samples, "d/train")
  with pytest.raises(ValueError, match=rf"config.{key}={samples + 1} is more than the {samples} samples of d/train"):
    job.check_batch_size(key, samples + 1, samples, "d/train")


def test_an_adapter_rank_beyond_the_projections_is_refused_when_attached():
  cfg = clip.preset("tiny")
  model = nnx.eval_shape(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0)))
  bound = min(cfg.vision.hidden_size, cfg.text.hidden_size)  # q_proj and v_proj are square in either tower
  with pytest.raises(ValueError, match=rf"adapter.rank={bound + 1} is more than {bound}.*use adapter.rank <= {bound}"):
    adapters.from_config({"method": "lora", "rank": bound + 1, "start_layer": 0}).attach(model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("family,stage_name", [("classifier", ""), ("mllm", "stage2")])
def test_a_non_finite_train_loss_stops_the_run_naming_the_learning_rate(tmp_path, family, stage_name):
  config = CONFIGS[family](tmp_path, [("log_every_steps", "1")])
  task = types.SimpleNamespace(config=config, device_batch=lambda micro: (micro, 0), device_arrays=lambda split: {})
  stage = tasks.Stage(name=stage_name, directory="checkpoints", trained=(), steps_per_epoch=4, epochs=1, max_steps=0,
                      batch_size=2, accum_steps=1, samples=8, tx=None, schedule=None, seed=0, validates=False,
                      patience=1)
  written = []
  run = loop.Run(task=task, stage=stage, workdir=tmp_path, ckpt=None, record=loop.Bookkeeping(),
                 train_step=lambda state, frozen, arrays, batch: (state, {"loss": jnp.asarray(jnp.nan)}),
                 train_iter=itertools.repeat({}), writer=types.SimpleNamespace(write=lambda *a: written.append(a)))
  section = stage_name or "optim"
  with pytest.raises(loop.Diverged, match=rf"train loss is nan at step 1.*lower --config.{section}.lr \(now "):
    loop.train_epoch(run, sigterm=None)
  assert not written  # nothing of the NaN step logged


def test_a_workdir_config_json_cut_short_is_named_with_its_fix(tmp_path):
  from mora_jax.train import answering  # pylint: disable=import-outside-toplevel
  (tmp_path / "config.json").write_text('{"task": "ml')
  with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json does not read as a JSON object .*restore it"):
    answering.is_run(tmp_path)
  assert not answering.is_run(tmp_path / "absent")
  with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json does not read as a JSON object"):
    cli.run_config(tmp_path)  # eval.py's first read of it, for the overrides' keys
