"""Device mesh and shardings: a 'data' axis over all devices; params by config rules.

Batches are sharded over 'data' (global-batch semantics: one jit over the global array).
Parameters are replicated unless a `config.sharding.rules` entry (param-path regex -> partition
spec) says otherwise, e.g. (("text/encoder/.*/kernel", (None, "data")),) for FSDP-style splits.
"""

from collections.abc import Sequence
import re
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from medvl_jax.errors import ConfigError

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all hosts).

  Axes are Auto (not Explicit): the N x N similarity of a batch-sharded InfoNCE has an ambiguous
  output sharding that Auto axes leave to the compiler.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Every device holds the same number of rows (hosts have equal device counts, so this also
  makes the batch divisible by the process count, which the input pipeline checks again)."""
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
      f"config.batch_size={batch_size} is not divisible by the {n} devices of "
      f"the mesh; use a multiple of {n}"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path) -> str:
  """'/'-joined key path of a pytree leaf, e.g. 'params/text/encoder/layer/0/...'."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedSharding per leaf: the first rule whose regex matches the leaf's path, else replicated."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def one(path, leaf):
    name = path_str(path)
    for regex, spec in compiled:
      if regex.search(name):
        spec = P(*spec)
        shape = getattr(leaf, "shape", ())
        for dim, axis in zip(shape, spec):
          if axis is not None and dim % mesh.shape[axis]:
            raise ConfigError(
              f"config.sharding.rules: {name} dim {dim} is not divisible by "
              f"mesh axis {axis!r} of size {mesh.shape[axis]}"
            )
        return NamedSharding(mesh, spec)
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's rows of the global batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
