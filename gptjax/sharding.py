"""The device mesh and the mapping from logical axis names to it.

Models name logical axes only (`embed`, `heads`, `batch`, ...). `config.mesh.rules` maps each
to mesh axes (`data`, `fsdp`, `tensor`) and this module turns that table into shardings.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 axis and checks that the axes multiply to the device count."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  wild = [i for i, s in enumerate(shape) if s == -1]
  spec = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
  if len(wild) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f"Mesh {spec}: sizes must be positive with at most one -1; "
                     "fix --config.mesh.*.")
  if wild:
    rest = math.prod(s for s in shape if s != -1)
    if num_devices % rest:
      raise UserError(f"Mesh {spec}: the fixed axes ({rest}) do not divide the {num_devices} "
                       "devices; choose sizes that divide the device count.")
    shape[wild[0]] = num_devices // rest
  if math.prod(shape) != num_devices:
    raise UserError(f"Mesh {spec} has {math.prod(shape)} devices but {num_devices} are "
                     "available; make data * fsdp * tensor equal the device count "
                     "(or set one axis to -1).")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all); `sizes` maps each axis
  to its size (`config.MeshConfig.sizes`)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  # Auto axes: the compiler propagates shardings from the annotated inputs and constraints
  # (jax.make_mesh now defaults to Explicit axes, a different programming model).
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (data * fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def rules_tuple(rules) -> tuple[tuple[str, object], ...]:
  """Normalises a config rules table (lists from JSON) to hashable tuples."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves carry logical axis names (unannotated: replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def under_mesh(fn, mesh: Mesh, rules):
  """`fn` traced with the mesh and logical rules in scope, so that the model's logical
  activation constraints apply (wrap a function before jitting it)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [batch, length] input array."""
  return nn.logical_to_mesh_sharding(P("batch", None), mesh, rules_tuple(rules))


def global_batch(batch: dict, batch_sharding: NamedSharding) -> dict:
  """This process's rows of a batch -> one global jax.Array per key."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


def barrier(name: str):
  """Waits until every process reaches the barrier of this name (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def check_divisible(abstract_tree, shardings, mesh: Mesh):
  """Raises naming the parameter and axis when a mesh axis does not divide a dimension."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                                    jax.tree_util.tree_leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        raise UserError(f"Parameter {jax.tree_util.keystr(path)} has a dimension of {dim} "
                         f"that mesh axes {axes} (size {size}) do not divide; change the "
                         "mesh or the rule in config.mesh.rules.")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           auto: bool = False):
  """Joins a multi-process JAX run (TPU VM slice, multi-node GPU, or local CPU processes).

  With a coordinator address, the processes are given explicitly; with `auto`, JAX detects
  the cluster (TPU VM workers, SLURM, Open MPI, Kubernetes). Must run before any JAX
  computation; afterwards `jax.devices()` spans every process.
  """
  if coordinator_address is None and not auto:
    return
  if jax.config.jax_platforms in (None, "", "cpu") and (num_processes or 0) > 1:
    # CPU devices of different processes talk through gloo (tests and laptops).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator_address needs --num_processes and --process_id too "
                       "(every process gets the same address and count, and its own id).")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
