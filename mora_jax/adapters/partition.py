"""The partitioned parameter tree: `backbone`, `adapter/common`, `adapter/specific/{vision,text}`, `prompt`,
`backbone_trained`, `head`.

The frozen backbone is plain `nnx.Param`; every trainable variable is a `Trainable` subclass whose type
names its partition. `split` turns a module into one nested dict of states with exactly these names (they
appear in checkpoints, optimizer labels and logs), and `join` rebuilds the module from it.
"""

import jax
import numpy as np
from flax import nnx


class Trainable(nnx.Variable):
  """Base of every trained variable; never used directly."""


class Common(Trainable):
  """Modality-common adapter parameters, shared by both towers (MoRA's A_c, B_c)."""


class VisionSpecific(Trainable):
  """Adapter parameters of the vision tower."""


class TextSpecific(Trainable):
  """Adapter parameters of the text tower."""


class Prompt(Trainable):
  """A prompting method's parameters (MMP's and DCP's prompts and the modules that make them)."""


class BackboneTrained(Trainable):
  """Backbone parameters a method trains (DCP: the towers' final LayerNorms and the vision projection); a method
  marks them by re-typing the frozen `nnx.Param` (`retype`)."""


class Head(Trainable):
  """The classifier head."""


SPECIFIC = {"vision": VisionSpecific, "text": TextSpecific}
# Partition name (as in checkpoints and logs) -> variable type.
PARTITIONS: dict[str, type[nnx.Variable]] = {
    "backbone": nnx.Param,
    "adapter/common": Common,
    "adapter/specific/vision": VisionSpecific,
    "adapter/specific/text": TextSpecific,
    "prompt": Prompt,
    "backbone_trained": BackboneTrained,
    "head": Head,
}
TRAINABLE_PARTITIONS = tuple(name for name in PARTITIONS if name != "backbone")


def retype(module: nnx.Module, kind: type[Trainable]) -> None:
  """Makes every frozen parameter held directly by `module` a `kind` one (its partition), in place."""
  for name, value in list(vars(module).items()):
    if isinstance(value, nnx.Param):
      setattr(module, name, kind(value.get_value(), **value.get_metadata()))


def _nest(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def _flatten(tree: dict) -> dict[str, object]:
  return {name: _get(tree, name) for name in PARTITIONS}


def _get(tree: dict, name: str):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def split(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """module -> (graphdef, {"backbone": ..., "adapter": {"common": ..., "specific": {...}}, "head": ...})."""
  graphdef, *states = nnx.split(module, *PARTITIONS.values())
  return graphdef, _nest(dict(zip(PARTITIONS, states)))


def join(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
  """Inverse of `split`."""
  return nnx.merge(graphdef, *_flatten(params).values())


def trainable(params: dict) -> dict:
  """The partitioned tree without its backbone (what gradients, optimizers and checkpoints see)."""
  return {k: v for k, v in params.items() if k != "backbone"}


def count(params: dict) -> dict[str, int]:
  """Number of scalar values per partition name."""
  return {name: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state))
          for name, state in _flatten(params).items()}
