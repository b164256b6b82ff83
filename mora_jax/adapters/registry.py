"""Every adapter method by name, and the one lookup from a run config's `adapter` section to a method's config.

One registry serves every model: "moka" is `MokAConfig` and "lora" is `LoRAConfig` whether they attach to a CLIP
model (the classifier) or to a decoder LM (the multimodal LLM):

    adapters.from_config({"method": "moka", "targets": ("q_proj", "o_proj"), "start_layer": 0}).attach(lm, rngs=rngs)

Every method keeps the contract `method.Method` (its class-level facts and `attach`). Adding a method is one new
file plus one line here. The file defines the config and the adapted projection:

    # mora_jax/adapters/vera.py
    @dataclasses.dataclass(frozen=True)
    class VeRAConfig(AdapterConfig):
      name: ClassVar[str] = "vera"
      scale: float = 1.0

      def adapt(self, base, target, shared, model, *, rngs):
        return VeRALinear(base, target.tower, self, rngs=rngs)  # an nnx.Module with __call__(x, call=None)

and the line adds `vera.VeRAConfig` to `METHODS` below. `AdapterConfig.attach` calls `adapt` on every target of the
model; `mergeable` (default True) says whether the adapted projection's `effective_kernel()` folds into the frozen
weights for inference, and `adapts_decoder` (default False) whether `adapt` also wraps a decoder LM's projections
(a target whose `tower` is common.DECODER). The prompt methods (MMP, DCP, mora_jax/adapters/prompts.py)
adapt no projection: their configs derive from `prompts.PromptConfig`, whose `attach` checks the backbone, marks
the backbone parts the method trains and `build`s the module that makes its prompt tokens.

A method's file may import mora_jax.models and the other adapter modules, never mora_jax.train or the data
builders: the trainer imports the adapters, not the other way round.
"""

import dataclasses
from collections.abc import Mapping

from mora_jax.adapters.common import AdapterConfig
from mora_jax.adapters.dora import DoRAConfig
from mora_jax.adapters.lora import LoRAConfig
from mora_jax.adapters.method import Method
from mora_jax.adapters.moka import MokAConfig
from mora_jax.adapters.mora import MoRAConfig
from mora_jax.adapters.prompts import DCPConfig, MMPConfig

LINEAR_PROBE = "linear"  # no adapter: frozen towers and a trained head
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (MoRAConfig, LoRAConfig, DoRAConfig, MokAConfig, MMPConfig, DCPConfig)}
NAMES = (*METHODS, LINEAR_PROBE)
# The fields every projection adapter takes (the prompt methods take none of them); a method's own fields (alpha,
# form, lam, ...) mean different things per method.
SHARED = tuple(f.name for f in dataclasses.fields(AdapterConfig))


def from_config(values: Mapping) -> Method | None:
  """{"method": name, <that method's fields>} -> its config (None for "linear"). Unknown methods and fields are
  errors that list the known ones; a field left out keeps the method's default."""
  values = dict(values)
  method = values.pop("method", None)
  if method == LINEAR_PROBE:
    if values:
      raise ValueError(f"adapter method 'linear' (the frozen linear probe) takes no fields; got {sorted(values)}.")
    return None
  if method not in METHODS:
    raise ValueError(f"adapter.method={method!r}: use one of {list(NAMES)}.")
  cls = METHODS[method]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"adapter method {method!r} has no field(s) {unknown}; its fields are {sorted(known)}.")
  return cls(**values)


def to_config(adapter: Method | None) -> dict:
  """The inverse of `from_config`: {"method": name, <every field>}."""
  if adapter is None:
    return {"method": LINEAR_PROBE}
  return {"method": adapter.name, **dataclasses.asdict(adapter)}


def switch(values: Mapping, method: str) -> tuple[dict, list[str]]:
  """The adapter section `values` rewritten for another `method`: the SHARED fields the new method takes are
  kept (none for "linear" and the prompt methods), its other fields take its defaults. Also returns the fields
  of `values` that were dropped (the old method's own ones), for a note to the user."""
  if method != LINEAR_PROBE and method not in METHODS:
    raise ValueError(f"adapter.method={method!r}: use one of {list(NAMES)}.")
  old = {k: v for k, v in values.items() if k != "method"}
  takes = set() if method == LINEAR_PROBE else {f.name for f in dataclasses.fields(METHODS[method])}
  kept = {k: v for k, v in old.items() if k in SHARED and k in takes}
  return to_config(from_config({"method": method, **kept})), sorted(set(old) - set(kept))
