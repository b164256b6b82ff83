"""Config files, the published recipes and command-line overrides."""

import pytest

from mora_jax import adapters
from mora_jax.train import config as config_lib
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
