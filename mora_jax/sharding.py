"""Device meshes and logical-axis sharding rules for parameter trees.

Every weight of the models here carries `logical_axes` metadata (one name per array dimension, e.g.
("embed", "mlp") for an fc1 kernel). A rule table maps logical names to mesh axes, so the same model
runs replicated, FSDP-sharded, or otherwise without touching model code.
"""

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis. FSDP: shard every weight along its model-width ("embed") dimension.
FSDP_RULES: tuple[tuple[str, str | None], ...] = (("embed", "fsdp"),)
REPLICATED_RULES: tuple[tuple[str, str | None], ...] = ()


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices=None) -> Mesh:
  """A mesh with Auto axes (GSPMD propagation); jax >= 0.12 would otherwise default to Explicit axes."""
  return jax.make_mesh(tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]]) -> PartitionSpec:
  """PartitionSpec for one array. A dimension whose size the mesh axis does not divide stays replicated
  (tiny test configs on 8 devices), and each mesh axis is used at most once per array."""
  rule = dict(rules)
  spec, used = [], set()
  for name, size in zip(logical_axes, shape, strict=True):
    axis = rule.get(name) if name is not None else None
    if axis is None or axis in used or axis not in mesh.shape or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh,
                      rules: Sequence[tuple[str, str | None]]) -> NamedSharding:
  value = variable.get_value()
  axes = variable.get_metadata().get("logical_axes")
  if axes is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_spec(axes, np.shape(value), mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, str | None]]):
  """A pytree of NamedSharding with the structure of `state`'s values (for jit in/out_shardings)."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(value, target: NamedSharding) -> jax.Array:
  """A host value (the same on every process) as a global array; each process fills only its own shards,
  so it works on one host and on many."""
  host = np.asarray(jax.device_get(value))
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def host_numpy(array: jax.Array) -> np.ndarray:
  """The whole value of a global array on this host; gathered across processes when it is sharded over
  several (every process must call it then)."""
  if not array.is_fully_addressable:
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def abstract(tree, target: NamedSharding):
  """`tree`'s shapes and dtypes as jax.ShapeDtypeStruct leaves placed by `target`: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), tree)


def replicate(tree, mesh: Mesh):
  """Every leaf of `tree` replicated over `mesh` (multi-host safe)."""
  return jax.tree.map(lambda x: place(x, NamedSharding(mesh, PartitionSpec())), tree)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> None:
  """Moves every variable of `module` onto `mesh` according to `rules`, in place (multi-host safe)."""
  state = nnx.state(module)
  for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    variable.set_value(place(variable.get_value(), variable_sharding(variable, mesh, rules)))
  nnx.update(module, state)


def is_main_process() -> bool:
  """Process 0: the one that prints, writes shared files and prepares data for the others."""
  return jax.process_index() == 0


def replicated_value(array: jax.Array) -> np.ndarray:
  """A replicated global array's value on this host (no communication)."""
  return np.asarray(array.addressable_data(0))


def process_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded over its first axis (as `global_arrays` placed them)."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows of host arrays, concatenated in process order (every process must call it; each
  holds the same number of rows)."""
  if jax.process_count() == 1:
    return arrays
  return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(arrays, tiled=True).items()}


def on_every_process(flags) -> np.ndarray:
  """Elementwise, whether each of `flags` holds on every process (every process must call it, with as many
  flags): what processes that each looked at a shared filesystem agree on."""
  flags = np.asarray(flags, bool)
  if jax.process_count() == 1:
    return flags
  return np.all(multihost_utils.process_allgather(flags), axis=0)


def sum_over_processes(value: int) -> int:
  """The sum of an integer over every process (every process must call it)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def batch_sharding(mesh: Mesh, micro_axis: bool) -> NamedSharding:
  """Batch dimension split over every mesh axis (data and fsdp); the micro-batch axis, if any, unsplit."""
  spec = (tuple(mesh.axis_names),)
  return NamedSharding(mesh, PartitionSpec(None, *spec) if micro_axis else PartitionSpec(*spec))


def global_arrays(host_tree, target: NamedSharding, micro_axis: bool):
  """This process's rows of a pytree of host arrays (a batch, or its typed inputs: mora_jax.data.inputs) -> the
  same tree of global arrays sharded by `target`; the batch dimension (after the micro-batch axis, if any) is the
  concatenation of every process's rows, in process order."""
  batch_dim = 1 if micro_axis else 0

  def place_rows(local) -> jax.Array:
    local = np.asarray(local)
    shape = list(local.shape)
    shape[batch_dim] *= jax.process_count()
    return jax.make_array_from_process_local_data(target, local, tuple(shape))

  return jax.tree.map(place_rows, host_tree)
