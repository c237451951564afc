"""Device mesh and shardings, both from config data.

Mesh (`config.mesh`): named axes with sizes, one of them -1 = all remaining devices, e.g.
  (('data', -1), ('fsdp', 1), ('model', 1))   pure data parallel (the default)
  (('data', 1), ('fsdp', -1), ('model', 1))   FSDP over every device (ZeRO-3 style)
  (('data', 2), ('fsdp', 4), ('model', 1))    2 data-parallel groups of 4-way FSDP
Batches are sharded over ('data', 'fsdp') together (global-batch semantics: one jit over the
global array; each device holds batch_size / (data x fsdp) rows); 'model' is free for tensor-
parallel rules and sees the batch replicated.

Parameters (and the optimizer state that mirrors them) follow `config.sharding.rules`: a tuple
of (path regex, spec); the first rule whose regex is found in a leaf's path (e.g.
'params/text/encoder/layer_0/attention/query/kernel'; optimizer moments carry the same suffix)
decides, and unmatched leaves are replicated. A spec is either
  a partition spec as a tuple, one entry per dimension: a mesh axis, None, or a tuple of axes,
    e.g. ('text/.*/kernel', (None, 'model'));
  'fsdp': shard the largest dimension divisible by the 'fsdp' axis over it; leaves smaller than
    `config.sharding.fsdp_min_size` elements stay replicated (biases, norms: not worth a gather).
Fallback: a dimension that does not divide by its axis size is replicated instead (not an error);
one log line names every leaf for which that happened.
"""

from collections.abc import Sequence
import math
import re
from typing import Any

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from medvl_jax.errors import ConfigError

DATA, FSDP, MODEL = "data", "fsdp", "model"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over these (those in the mesh)
DEFAULT_AXES = ((DATA, -1), (FSDP, 1), (MODEL, 1))  # pure data parallel
# Every parameter leaf sharded over 'fsdp' by its largest divisible dimension: the rule set of
# the large variants (configs/convirt.py:large, configs/mixed.py:large).
FSDP_RULES = ((".*", "fsdp"),)
FSDP_MIN_SIZE = 2**14  # elements; smaller leaves stay replicated under an 'fsdp' rule


def mesh_shape(axes: Sequence[tuple[str, int]], n_devices: int) -> tuple[tuple[str, ...], tuple]:
  """(names, sizes) of `axes` over `n_devices`, the -1 entry filled; ConfigError if impossible."""
  try:
    names = tuple(str(a) for a, _ in axes)
    sizes = [int(s) for _, s in axes]
  except (TypeError, ValueError) as e:
    raise ConfigError(
      f"config.mesh={axes!r}: expected ((axis name, size), ...), e.g. (('data', -1), ('fsdp', 1))"
    ) from e
  if not names or len(set(names)) != len(names):
    raise ConfigError(f"config.mesh={axes!r}: axis names must be present and distinct")
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh={axes!r}: sizes must be positive, with at most one -1 (fill)")
  fixed = math.prod(s for s in sizes if s != -1)
  if fill:
    if n_devices % fixed:
      raise ConfigError(
        f"config.mesh={axes!r}: the fixed axis sizes (product {fixed}) do not divide "
        f"the {n_devices} devices"
      )
    sizes[fill[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ConfigError(
      f"config.mesh={axes!r}: the axis sizes multiply to {fixed}, not to the {n_devices} devices"
    )
  return names, tuple(sizes)


def make_mesh(
  devices: Sequence[jax.Device] | None = None, axes: Sequence[tuple[str, int]] = DEFAULT_AXES
) -> Mesh:
  """A mesh of `axes` over `devices` (default: all devices of all hosts).

  Built with `jax.make_mesh` (device order that follows the physical topology on TPU). Axes are
  Auto, not JAX 0.10's default Explicit: the N x N similarity of a batch-sharded InfoNCE has an
  ambiguous output sharding that Auto axes leave to the compiler.
  """
  devices = jax.devices() if devices is None else list(devices)
  names, sizes = mesh_shape(axes, len(devices))
  return jax.make_mesh(
    sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=np.asarray(devices).ravel()
  )


def batch_spec_axes(mesh: Mesh) -> tuple[str, ...]:
  """The `BATCH_AXES` the mesh has, in `BATCH_AXES` order and of any size: the axes of the
  batch's partition spec (`batch_sharding`)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_split_axes(mesh) -> tuple[str, ...]:
  """The `BATCH_AXES` of size > 1, in mesh order: the axes a collective over the batch rows runs
  over (`losses.contrastive`); empty when every device holds the whole batch.

  `mesh` may be a Mesh or an AbstractMesh (`jax.sharding.get_abstract_mesh()` under jit).
  """
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES and mesh.shape[a] > 1)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in batch_spec_axes(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Every batch shard holds the same number of rows (hosts have equal device counts, so this
  also makes the batch divisible by the process count, which the input pipeline checks again)."""
  n = batch_shards(mesh)
  if batch_size % n:
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_spec_axes(mesh))
    raise ConfigError(
      f"config.batch_size={batch_size} is not divisible by the {n} batch shards of the mesh "
      f"({axes}); use a multiple of {n}"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = batch_spec_axes(mesh)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))


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


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def leaf_spec(
  name: str, shape: tuple[int, ...], spec: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE
) -> tuple[P, list[str]]:
  """The partition spec of one leaf under one rule's spec, and the fallbacks it needed."""
  fallbacks = []
  if spec == "fsdp":
    if FSDP not in mesh.axis_names:
      raise ConfigError(
        f"config.sharding.rules: 'fsdp' spec for {name}, but the mesh has no 'fsdp'"
      )
    n = mesh.shape[FSDP]
    if n == 1 or math.prod(shape) < min_size:
      return P(), []
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % n == 0]
    if not dims:
      return P(), [f"{name} {tuple(shape)} (no dimension divisible by fsdp={n})"]
    entries = [None] * len(shape)
    entries[dims[0]] = FSDP
    return P(*entries), []
  if isinstance(spec, str) or not isinstance(spec, (tuple, list)):
    raise ConfigError(
      f"config.sharding.rules: spec {spec!r} for {name} is neither 'fsdp' nor a tuple of axes"
    )
  if len(spec) > len(shape):
    raise ConfigError(
      f"config.sharding.rules: spec {tuple(spec)!r} has more entries than {name}'s {len(shape)} "
      "dimensions"
    )
  entries = list(spec)
  for d, entry in enumerate(entries):
    axes = _axes_of(entry)
    for a in axes:
      if a not in mesh.axis_names:
        raise ConfigError(
          f"config.sharding.rules: axis {a!r} (for {name}) is not a mesh axis; "
          f"valid: {', '.join(mesh.axis_names)}"
        )
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and shape[d] % size:
      fallbacks.append(f"{name} dim {d} ({shape[d]}) by {'x'.join(axes)}={size}")
      entries[d] = None
  return P(*entries), fallbacks


def tree_shardings(
  abstract_tree: Any,
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]],
  min_size: int = FSDP_MIN_SIZE,
  log: bool = True,
) -> Any:
  """NamedSharding per leaf: the first rule whose regex matches the leaf's path, else replicated.

  Dimensions that do not divide fall back to replication, named in one log line.
  """
  try:
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
  except (TypeError, ValueError, re.error) as e:
    raise ConfigError(f"config.sharding.rules={rules!r}: expected ((regex, spec), ...): {e}") from e
  fallbacks, sharded, total = [], [0], [0]

  def one(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    total[0] += 1
    for regex, spec in compiled:
      if regex.search(name):
        pspec, fell = leaf_spec(name, shape, spec, mesh, min_size)
        fallbacks.extend(fell)
        sharded[0] += any(e is not None for e in pspec)
        return NamedSharding(mesh, pspec)
    return replicated(mesh)

  out = jax.tree_util.tree_map_with_path(one, abstract_tree)
  if log and compiled:
    logging.info("sharding: %d of %d leaves sharded by config.sharding.rules", sharded[0], total[0])
  if log and fallbacks:
    logging.info(
      "sharding: replicated where the dimension does not divide (%d): %s",
      len(fallbacks),
      "; ".join(fallbacks),
    )
  return out


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's rows of the global batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
