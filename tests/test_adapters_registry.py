"""The adapter registry: the one lookup from a config dict to a method, and a method added in one place."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import lora, moka, partition, registry
from mora_jax.models import llama
from mora_jax.train import recipes
from tests import helpers


def test_every_method_round_trips_through_its_config_dict():
  for name, cls in registry.METHODS.items():
    projections = issubclass(cls, adapters.AdapterConfig)
    adapter = cls(targets=("q_proj",), start_layer=1, rank=2) if projections else cls(length=6, depth=2)
    values = adapters.to_config(adapter)
    assert values["method"] == name == adapter.name
    assert adapters.from_config(values) == adapter
    # A config file stores tuples as lists (JSON); they come back as the same config.
    list_field = "targets" if projections else "trained_backbone"
    assert adapters.from_config({**values, list_field: list(values[list_field])}) == adapter
  assert adapters.from_config({"method": "linear"}) is None
  assert adapters.to_config(None) == {"method": "linear"}


def test_every_method_keeps_the_method_contract():
  for cls in registry.METHODS.values():
    assert isinstance(cls(), adapters.Method), cls


def test_moka_and_lora_are_one_config_each_for_clip_and_a_decoder_lm():
  lm_config = llama.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                num_attention_heads=2)
  for method, tower_layer in (("moka", moka.TowerLinear), ("lora", lora.LoRALinear)):
    values = {"method": method, "targets": ("q_proj", "v_proj"), "start_layer": 1}
    clf = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0), adapters.from_config(values), 3)
    assert isinstance(clf.backbone.text_model.encoder.layers[1].self_attn.q_proj, tower_layer)
    lm = llama.init(lm_config)
    attached = adapters.from_config(values).attach(lm, rngs=nnx.Rngs(0))
    assert isinstance(lm.model.layers[1].self_attn.v_proj, moka.DecoderMokA) and attached.prompts is None
    assert not isinstance(lm.model.layers[0].self_attn.v_proj, moka.DecoderMokA)
  with pytest.raises(ValueError, match=r"adapter.targets=\('o_proj',\): a CLIP tower has no \['o_proj'\]; its "
                     r"projections are \('q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'\)\.$"):
    adapters.build_classifier(clip.init(helpers.tiny_config()), adapters.MokAConfig(targets=("o_proj",)), 3)


@pytest.mark.parametrize("values, message", [
    ({"method": "qlora"}, r"adapter.method='qlora': use one of \['mora', 'lora', 'dora', 'moka', 'mmp', 'dcp', 'linear'\]"),
    ({"rank": 4}, "adapter.method=None"),
    ({"method": "lora", "lam": 0.5}, r"'lora' has no field\(s\) \['lam'\]; its fields are .*'alpha'"),
    ({"method": "linear", "rank": 4}, r"takes no fields; got \['rank'\]"),
])
def test_unknown_methods_and_fields_are_named(values, message):
  with pytest.raises(ValueError, match=message):
    adapters.from_config(values)


def test_switching_to_a_prompt_method_drops_the_projection_fields():
  values, dropped = registry.switch(adapters.to_config(adapters.MoRAConfig()), "dcp")
  assert values == adapters.to_config(adapters.DCPConfig())
  assert {"targets", "rank", "start_layer", "alpha"} <= set(dropped)
  assert registry.switch(values, "lora")[0] == adapters.to_config(adapters.LoRAConfig())


def test_prompt_recipes_take_the_dcp_code_settings():
  for dataset in ("mm_imdb", "upmc_food101", "hateful_memes"):
    for method in recipes.PROMPT_METHODS:
      c = recipes.get(dataset, method)
      length = {"dcp": 36, "mmp": 16}[method]  # MMP: MAP's code's length (docs/prompts.md)
      assert (c.adapter.length, c.adapter.depth, c.epochs, c.batch_size) == (length, 6, 20, 256)
      assert (c.optim.lr, c.optim.weight_decay, c.optim.decay) == (1e-2, 0.02, "linear")
      assert c.preprocessing.missing_image == "ones_after_norm"
  assert recipes.get("hateful_memes", "mora").optim.decay == "cosine"
  easy = recipes.get("easy_vqa", "dcp")  # the study's run settings, every layer of the 4-layer embedded CLIP
  assert (easy.adapter.depth, easy.epochs, easy.batch_size, easy.optim.decay) == (4, 1, 64, "cosine")
  mmp = recipes.get("mm_imdb", "mmp").adapter
  assert (mmp.init, mmp.init_std) == ("normal", 0.3)


def test_recipes_give_each_method_its_own_fields_and_drop_nothing(monkeypatch):
  assert recipes.get("hateful_memes", "mora").adapter.alpha == 0.1
  assert recipes.get("hateful_memes", "lora").adapter.alpha == adapters.LoRAConfig.alpha  # PEFT's, not MoRA's
  assert recipes.get("hateful_memes", "moka").adapter.alpha == adapters.MokAConfig.alpha
  assert recipes.get("hateful_memes", "linear").adapter.to_dict() == {"method": "linear"}
  monkeypatch.setitem(recipes.PUBLISHED, "hateful_memes", {**recipes.PUBLISHED["hateful_memes"], "lr": 3e-4})
  with pytest.raises(ValueError, match=r"recipe 'hateful_memes': nothing reads \['lr'\]"):
    recipes.get("hateful_memes", "mora")
  monkeypatch.setitem(recipes.PUBLISHED, "mm_imdb", {**recipes.PUBLISHED["mm_imdb"], "method": {"mroa": {}}})
  with pytest.raises(ValueError, match=r"nothing reads \['mroa'\]"):
    recipes.get("mm_imdb", "lora")


class ScaledLinear(nnx.Module):
  """A toy method: y = x K (1 + s), s trained per output feature."""

  def __init__(self, base, tower: str):
    self.base = base
    self.s = partition.SPECIFIC[tower](jnp.zeros((base.kernel.shape[1],), jnp.float32))

  def effective_kernel(self):
    return self.base.kernel[...] * (1 + self.s[...])

  def __call__(self, x, call=None):
    return x @ self.effective_kernel() + self.base.bias[...]


@dataclasses.dataclass(frozen=True)
class ScaledConfig(adapters.AdapterConfig):
  name: ClassVar[str] = "scaled"

  def adapt(self, base, target, shared, model, *, rngs):
    return ScaledLinear(base, target.tower)


def test_a_method_added_in_one_file_and_one_registry_line_trains_and_merges(monkeypatch):
  monkeypatch.setitem(registry.METHODS, ScaledConfig.name, ScaledConfig)
  adapter = adapters.from_config({"method": "scaled", "targets": ["q_proj", "fc1"], "start_layer": 0})
  clf = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0), adapter, 3)
  assert adapters.count_parameters(clf)["per_partition"]["adapter/specific/text"] == 2 * (32 + 64)
  helpers.perturb_trainables(clf)
  pixels, ids, mask = helpers.random_inputs(clf.backbone.config)
  np.testing.assert_allclose(np.asarray(adapters.merge(clf)(pixels, ids, mask)), np.asarray(clf(pixels, ids, mask)),
                             atol=1e-5)


def test_switch_keeps_the_shared_fields_and_returns_the_dropped_ones():
  moka = registry.to_config(registry.from_config({"method": "moka", "rank": 8, "lam": 0.1}))
  dora, dropped = registry.switch(moka, "dora")
  assert dora == registry.to_config(registry.from_config({"method": "dora", "rank": 8, "dropout": 0.05}))
  assert dropped == ["alpha", "decoder_masks", "lam", "lambdas", "scale_placement", "temperature"]
  assert registry.switch(moka, "linear")[0] == {"method": "linear"}
  with pytest.raises(ValueError, match="use one of"):
    registry.switch(moka, "vera")
