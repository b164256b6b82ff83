"""What every projection adapter shares: the config base (which projections, and how to wrap one), attaching to a
CLIP model's towers or a decoder LM, target selection, PEFT's init of a down-projection, and input dropout."""

import dataclasses
from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters.method import Attached
from mora_jax.models.config import CLIPConfig
from mora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from mora_jax.models.modeling import CLIP, Call, Linear

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_TARGETS = ("fc1", "fc2")
TOWERS = ("vision", "text")
DECODER = "decoder"  # a Target's `tower` in a decoder LM
DECODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DECODER_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
CLIP_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
DECODER_TARGETS = DECODER_ATTENTION_TARGETS + DECODER_MLP_TARGETS


class Target(NamedTuple):
  """One projection an adapter replaces: `parent.<name>` in layer `layer` of `tower` (a CLIP tower, or DECODER)."""
  tower: str
  layer: int
  parent: nnx.Module
  name: str


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which projections are adapted: `targets` by Hugging Face name, in layers >= start_layer of a CLIP model's
  `towers`, or of a decoder LM for a method with a decoder form (`adapts_decoder`; `towers` is not read there).

  A method subclasses it with its own fields, its registry `name`, the class-level facts of `method.Method`
  (mergeable, text_first, separable, frozen_prefix) where they differ from these defaults, and `adapt`, which
  wraps one frozen projection; `attach`, the Method contract, wraps every target of a model.
  """
  name: ClassVar[str]
  mergeable: ClassVar[bool] = True
  text_first: ClassVar[bool] = False
  separable: ClassVar[bool] = True
  frozen_prefix: ClassVar[bool] = True
  adapts_decoder: ClassVar[bool] = False
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  start_layer: int = 10
  rank: int = 4
  dropout: float = 0.1
  towers: tuple[str, ...] = TOWERS

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "towers", tuple(self.towers))
    # A name that no model the method attaches to has is caught here, before any model is built; `attach`
    # checks the targets against the model at hand.
    known = tuple(dict.fromkeys(CLIP_TARGETS + DECODER_TARGETS)) if self.adapts_decoder else CLIP_TARGETS
    unknown = [t for t in self.targets if t not in known]
    if unknown or not self.targets:
      raise ValueError(f"targets {self.targets}: each must be one of {known}.")
    if not set(self.towers) <= set(TOWERS) or not self.towers:
      raise ValueError(f"towers {self.towers}: use a non-empty subset of {TOWERS}.")
    if self.rank < 1 or not 0 <= self.dropout < 1 or self.start_layer < 0:
      raise ValueError(f"rank={self.rank} must be >= 1, dropout={self.dropout} in [0, 1), "
                       f"start_layer={self.start_layer} >= 0.")

  def attach(self, model: CLIP | LlamaForCausalLM, *, rngs: nnx.Rngs) -> Attached:
    """Replaces every target projection of `model` by its adapted form, in place, in `targets`' order (which
    fixes the order of the parameter draws)."""
    chosen = list(targets(model, self))
    _check_rank(self.rank, chosen)
    shared = nnx.Dict()
    for target in chosen:
      base = getattr(target.parent, target.name)
      setattr(target.parent, target.name, self.adapt(base, target, shared, model.config, rngs=rngs))
    return Attached(shared, prompts=None)

  def adapt(self, base: Linear, target: Target, shared: nnx.Dict, model: CLIPConfig | LlamaConfig, *,
            rngs: nnx.Rngs) -> nnx.Module:
    """The adapted replacement of `base` at `target`. `shared` holds modules several projections share (keyed by
    the method), `model` the architecture of the model it attaches to."""
    raise NotImplementedError(f"{type(self).__name__} does not say how to adapt a projection.")


def tower_layers(model: CLIP, tower: str) -> nnx.List:
  return (model.vision_model if tower == "vision" else model.text_model).encoder.layers


def targets(model: CLIP | LlamaForCausalLM, cfg: AdapterConfig) -> Iterator[Target]:
  """Every projection `cfg` adapts in `model`: tower by tower in a CLIP model, or in a decoder LM's layers. Target
  names `model` lacks, a method without a decoder form on a decoder, and a start layer past the last layer are
  errors."""
  if isinstance(model, LlamaForCausalLM):
    if not cfg.adapts_decoder:
      raise ValueError(f"adapter method {cfg.name!r} adapts CLIP towers only, not a decoder LM's projections.")
    _check_targets(cfg, DECODER_TARGETS, "a decoder LM")
    yield from _layer_targets(DECODER, model.model.layers, cfg, DECODER_ATTENTION_TARGETS, "the LM")
    return
  _check_targets(cfg, CLIP_TARGETS, "a CLIP tower")
  for tower in cfg.towers:
    yield from _layer_targets(tower, tower_layers(model, tower), cfg, ATTENTION_TARGETS, f"the {tower} tower")


def _check_targets(cfg: AdapterConfig, valid: tuple[str, ...], model: str) -> None:
  unknown = [t for t in cfg.targets if t not in valid]
  if unknown:
    raise ValueError(f"adapter.targets={cfg.targets}: {model} has no {unknown}; its projections are {valid}.")


def _check_rank(rank: int, chosen: list[Target]) -> None:
  """A rank beyond the smaller side of a projection adds parameters but no directions (its update's rank is bounded
  by that side), and one far beyond it allocates factors that can exhaust the device's memory before any step."""
  bound = min(min(getattr(t.parent, t.name).kernel.shape) for t in chosen)
  if rank > bound:
    raise ValueError(f"adapter.rank={rank} is more than {bound}, the smaller side of the narrowest projection it "
                     f"adapts; use adapter.rank <= {bound}.")


def _layer_targets(tower: str, layers: nnx.List, cfg: AdapterConfig, attention: tuple[str, ...],
                   stack: str) -> Iterator[Target]:
  """The targets of layers >= start_layer, layer by layer, each layer's in `cfg.targets`' order."""
  if cfg.start_layer >= len(layers):
    raise ValueError(f"start_layer={cfg.start_layer} but {stack} has only {len(layers)} layers.")
  for index in range(cfg.start_layer, len(layers)):
    layer = layers[index]
    for name in cfg.targets:
      yield Target(tower, index, layer.self_attn if name in attention else layer.mlp, name)


def kaiming_uniform_a(key, d_in: int, rank: int) -> jax.Array:
  """PEFT's init of lora_A: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in))."""
  bound = d_in**-0.5
  return jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound)


def call_rngs(call: Call | None) -> nnx.Rngs | None:
  """The dropout stream of a forward pass (None: deterministic)."""
  return None if call is None else call.rngs


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout with a fresh key from `rngs.dropout` per call; identity when rngs is None."""
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
