"""The partitioned parameter tree. The CLIP classifier's: `backbone`, `adapter/common`,
`adapter/specific/{vision,text}`, `prompt`, `backbone_trained`, `head`; the multimodal LLM's: `backbone` (the
vision tower and the LM), `adapter/decoder`, `projector`.

The frozen backbone is plain `nnx.Param`; every trainable variable is a `Trainable` subclass whose type
names its partition. `split` turns a module into one nested dict of states with exactly the names its class
lists in `partitions` (they appear in checkpoints, optimizer labels and logs), and `join` rebuilds the module
from it.
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


class Decoder(Trainable):
  """Adapter parameters of a decoder LM's projections (every modality's A and the shared B, stacked per
  projection: mora_jax.adapters.moka.DecoderMokA)."""


class Projector(Trainable):
  """The multimodal LLM's projector from vision features to the LM's width."""


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
    "adapter/decoder": Decoder,
    "projector": Projector,
}
TRAINABLE_PARTITIONS = tuple(name for name in PARTITIONS if name != "backbone")
# Which partitions each model has (its class's `partitions`): every one of them appears in its tree, empty or not.
CLASSIFIER = ("backbone", "adapter/common", "adapter/specific/vision", "adapter/specific/text", "prompt",
              "backbone_trained", "head")
MLLM = ("backbone", "adapter/decoder", "projector")


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
  """Partition name -> state, for the partitions `tree` holds (in PARTITIONS' order)."""
  return {name: _get(tree, name) for name in PARTITIONS if _get(tree, name) is not None}


def _get(tree: dict, name: str):
  for part in name.split("/"):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def split(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """module -> (graphdef, {"backbone": ..., "adapter": {"common": ..., "specific": {...}}, "head": ...}): the
  partitions its class lists in `partitions`."""
  names = type(module).partitions
  graphdef, *states = nnx.split(module, *(PARTITIONS[name] for name in names))
  return graphdef, _nest(dict(zip(names, states)))


def join(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
  """Inverse of `split`."""
  return nnx.merge(graphdef, *_flatten(params).values())


def trainable(params: dict) -> dict:
  """The partitioned tree without its backbone (what gradients, optimizers and checkpoints see)."""
  return {k: v for k, v in params.items() if k != "backbone"}


def select(params: dict, names) -> dict:
  """The partitioned tree of just the partitions `names` (those of them `params` holds)."""
  return _nest({name: state for name, state in _flatten(params).items() if name in names})


def combine(*trees: dict) -> dict:
  """One partitioned tree of the partitions of `trees` (disjoint: a later tree's partition replaces an
  earlier one's)."""
  return _nest({name: state for tree in trees for name, state in _flatten(tree).items()})


def rest(params: dict, names) -> dict:
  """The partitioned tree without the partitions `names`."""
  return _nest({name: state for name, state in _flatten(params).items() if name not in names})


def count(params: dict) -> dict[str, int]:
  """Number of scalar values per partition name."""
  return {name: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state))
          for name, state in _flatten(params).items()}
