"""The contract every adapter method keeps, whatever model it attaches to.

A method is a frozen dataclass (its fields are the run config's `adapter` section, mora_jax/adapters/registry.py)
with class-level facts the training and evaluation code reads, and `attach`, which changes a frozen model in
place: a projection adapter (common.AdapterConfig: MoRA, LoRA, DoRA, MokA) replaces the targeted projections of a
CLIP model's towers, or, for LoRA and MokA, of a decoder LM (mora_jax.models.llama); a prompt method
(prompts.PromptConfig: MMP, DCP) marks the backbone parts it trains and makes the module of its prompt tokens.
"""

from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

from flax import nnx

from mora_jax.models.llama import LlamaForCausalLM
from mora_jax.models.modeling import CLIP


class Attached(NamedTuple):
  """What a method adds next to the model it attaches to: `shared`, the modules several adapted projections read
  (MoRA's modality-common pairs, keyed by layer), and `prompts`, the module that makes each sample's prompt tokens
  from its missing code (None: the method makes none)."""
  shared: nnx.Dict
  prompts: nnx.Module | None


@runtime_checkable
class Method(Protocol):
  """An adapter method's config.

  name: its registry name. mergeable: its update folds into the frozen weights for inference. separable: each
  CLIP tower's features depend on that tower's input only (an evaluation computes each tower once for all missing
  scenarios). frozen_prefix: the layers below `start_layer` stay the frozen backbone's (their activations can be
  cached). text_first: the classifier runs the text tower before the vision tower (MokA's vision projections read
  the text rows). start_layer: the first layer it changes. A method whose `attach` makes prompts also says, by
  `zeroes()`, whether the head sees zeros for the missing modality's feature.
  """
  name: ClassVar[str]
  mergeable: ClassVar[bool]
  separable: ClassVar[bool]
  frozen_prefix: ClassVar[bool]
  text_first: ClassVar[bool]
  start_layer: int

  def attach(self, model: CLIP | LlamaForCausalLM, *, rngs: nnx.Rngs) -> Attached:
    """Adapts `model` in place (its parameters drawn from `rngs.params`); an error names the config field that
    does not fit the model."""
