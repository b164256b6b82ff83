"""The adapter registry: the one lookup from a config dict to a method, and a method added in one place."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import partition, registry
from mora_jax.train import recipes
from tests import helpers


def test_every_method_round_trips_through_its_config_dict():
  for name, cls in registry.METHODS.items():
    adapter = cls(targets=("q_proj",), start_layer=1, rank=2)
    values = adapters.to_config(adapter)
    assert values["method"] == name == adapter.name
    assert adapters.from_config(values) == adapter
    # A config file stores tuples as lists (JSON); they come back as the same config.
    assert adapters.from_config({**values, "targets": ["q_proj"]}) == adapter
  assert adapters.from_config({"method": "linear"}) is None
  assert adapters.to_config(None) == {"method": "linear"}


@pytest.mark.parametrize("values, message", [
    ({"method": "qlora"}, r"adapter.method='qlora': use one of \['mora', 'lora', 'dora', 'moka', 'linear'\]"),
    ({"rank": 4}, "adapter.method=None"),
    ({"method": "lora", "lam": 0.5}, r"'lora' has no field\(s\) \['lam'\]; its fields are .*'alpha'"),
    ({"method": "linear", "rank": 4}, r"takes no fields; got \['rank'\]"),
])
def test_unknown_methods_and_fields_are_named(values, message):
  with pytest.raises(ValueError, match=message):
    adapters.from_config(values)


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
  assert dropped == ["alpha", "lam", "lambdas", "scale_placement", "temperature"]
  assert registry.switch(moka, "linear")[0] == {"method": "linear"}
  with pytest.raises(ValueError, match="use one of"):
    registry.switch(moka, "vera")
