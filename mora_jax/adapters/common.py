"""What every adapter method shares: the config base (which projections, and how to wrap one), target
selection, and input dropout."""

import dataclasses
from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.models.modeling import CLIP, Call, EncoderLayer, Linear
from mora_jax.models.config import CLIPConfig

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_TARGETS = ("fc1", "fc2")
TOWERS = ("vision", "text")


class Target(NamedTuple):
  """One projection an adapter replaces: `parent.<name>` in layer `layer` of `tower`."""
  tower: str
  layer: int
  parent: nnx.Module
  name: str


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which projections are adapted: `targets` by Hugging Face name, in `towers`, in layers >= start_layer.

  A method subclasses it with its own fields, its registry `name`, whether its update folds into the frozen
  weights (`mergeable`), whether the classifier runs the text tower before the vision tower (`text_first`:
  MokA's vision projections read the text rows), whether each tower's features depend on its own input only
  (`separable`: a test computes each tower once for all missing scenarios), whether the layers below
  `start_layer` stay the frozen backbone's (`frozen_prefix`: their activations can be cached), and `adapt`,
  which wraps one frozen projection.
  """
  name: ClassVar[str]
  mergeable: ClassVar[bool] = True
  text_first: ClassVar[bool] = False
  separable: ClassVar[bool] = True
  frozen_prefix: ClassVar[bool] = True
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  start_layer: int = 10
  rank: int = 4
  dropout: float = 0.1
  towers: tuple[str, ...] = TOWERS

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "towers", tuple(self.towers))
    unknown = [t for t in self.targets if t not in ATTENTION_TARGETS + MLP_TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"targets {self.targets}: each must be one of {ATTENTION_TARGETS + MLP_TARGETS}.")
    if not set(self.towers) <= set(TOWERS) or not self.towers:
      raise ValueError(f"towers {self.towers}: use a non-empty subset of {TOWERS}.")
    if self.rank < 1 or not 0 <= self.dropout < 1 or self.start_layer < 0:
      raise ValueError(f"rank={self.rank} must be >= 1, dropout={self.dropout} in [0, 1), "
                       f"start_layer={self.start_layer} >= 0.")


  def adapt(self, base: Linear, target: Target, shared: nnx.Dict, model: CLIPConfig, *,
            rngs: nnx.Rngs) -> nnx.Module:
    """The adapted replacement of `base` at `target`. `shared` holds modules several projections share (keyed by
    the method), `model` the backbone's architecture."""
    raise NotImplementedError(f"{type(self).__name__} does not say how to adapt a projection.")


def tower_layers(model: CLIP, tower: str) -> nnx.List:
  return (model.vision_model if tower == "vision" else model.text_model).encoder.layers


def targets(model: CLIP, cfg: AdapterConfig) -> Iterator[Target]:
  """Every projection `cfg` adapts."""
  for tower in cfg.towers:
    layers = tower_layers(model, tower)
    if cfg.start_layer >= len(layers):
      raise ValueError(f"start_layer={cfg.start_layer} but the {tower} tower has only {len(layers)} layers.")
    for index in range(cfg.start_layer, len(layers)):
      layer: EncoderLayer = layers[index]
      for name in cfg.targets:
        yield Target(tower, index, layer.self_attn if name in ATTENTION_TARGETS else layer.mlp, name)


def call_rngs(call: Call | None) -> nnx.Rngs | None:
  """The dropout stream of a forward pass (None: deterministic)."""
  return None if call is None else call.rngs


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout with a fresh key from `rngs.dropout` per call; identity when rngs is None."""
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
