"""Ahead-of-time compile of the train step for a target without its hardware: the check to run
before booking a pod.

  python -m medvl_jax.main --config=configs/convirt.py --config.batch_size=4096 \
    --compile_only --topology=v5e:4x4

`--topology` names a TPU slice as libtpu does, `<chip>:<chips per dimension>` (v4:2x2x2,
v5e:4x4, v5p:2x2x4, v6e:4x4). It is compiled on this machine (CPU only is fine) through the
compile-only TPU devices of the PyPI `libtpu` that jax pins (the `tpu` extra of setup.py).
`--topology=local` compiles for the devices attached here (CPU, or the GPUs/TPUs of this host).

The same step as training (model, loss, optimizer, config.mesh, config.sharding.rules, batch
sharding, donated state) is lowered on abstract inputs: nothing is initialised, read or trained.
Reported, per device, from the compiled program's memory analysis: arguments (params, optimizer
state, batch shard), outputs (aliased with the donated arguments), temporaries (activations,
gradients, collectives' buffers), generated code; their peak against the chip's HBM; and FLOPs
per step from the compiled cost analysis (per device, and times the device count).
"""

import dataclasses
import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from medvl_jax import config_check
from medvl_jax.data import batch as batch_lib
from medvl_jax.errors import ConfigError
from medvl_jax.parallel import sharding
from medvl_jax.train import program
from medvl_jax.train import step as step_lib

GIB = 2**30
# HBM per JAX device (a chip; v2/v3 expose each of a chip's 2 TensorCores as a device with half
# the chip's memory), by the device_kind libtpu reports. Cloud TPU docs, system architecture.
HBM_GIB = {
  "TPU v2": ("v2", 8),
  "TPU v3": ("v3", 16),
  "TPU v4": ("v4", 32),
  "TPU v4 lite": ("v4i", 8),
  "TPU v5 lite": ("v5e", 16),
  "TPU v5": ("v5p", 95),
  "TPU v6 lite": ("v6e", 32),
  "TPU7x": ("tpu7x", 96),
}
TOPOLOGY_EXAMPLES = "v4:2x2x2, v5e:4x4, v5p:2x2x4, v6e:4x4, or local"


@dataclasses.dataclass
class Report:
  target: str
  devices: int
  device_kind: str
  mesh: dict
  batch_size: int
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  flops_per_device: float
  hbm: int | None  # bytes per device; None: unknown (CPU)
  chip: str
  compile_s: float
  note: str = ""  # set when the compiler stopped (out of memory): figures are its own

  @property
  def peak(self) -> int:
    """Live at once: arguments, outputs not aliased to donated arguments, temporaries, code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def fits(self) -> bool | None:
    return None if self.hbm is None else self.peak <= self.hbm

  def lines(self) -> list[str]:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    mesh = " ".join(f"{a}={n}" for a, n in self.mesh.items())
    out = [
      f"compile-only: {self.target}: {self.devices} x {self.device_kind}, mesh {mesh}, "
      f"global batch {self.batch_size}; compiled in {self.compile_s:.1f} s",
      f"per device: arguments {g(self.arguments)} | outputs {g(self.outputs)} "
      f"(aliased to donated arguments {g(self.aliased)}) | temporaries {g(self.temporaries)} "
      f"| code {g(self.code)}",
      f"FLOPs per step: {self.flops_per_device * self.devices:.3e} "
      f"({self.flops_per_device:.3e} per device)"
      if self.flops_per_device == self.flops_per_device  # not NaN
      else "FLOPs per step: unknown (no cost analysis)",
    ]
    if self.note:
      out.append(self.note)
    if self.hbm is None:
      out.append(f"peak per device {g(self.peak)}; no HBM size known for {self.device_kind}")
    else:
      verdict = "fits" if self.fits else "does not fit"
      out.append(
        f"peak per device {g(self.peak)} of {g(self.hbm)} HBM ({self.chip}, "
        f"{100 * self.peak / self.hbm:.0f}%): {verdict}"
      )
    return out


def _tpu_devices(topology: str) -> list:
  """Compile-only devices of a TPU slice (libtpu, no TPU needed); ConfigError if unknown."""
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if cloud_tpu_init.get_tpu_library_path() is None:
    raise ConfigError(
      f"--topology={topology}: compiling for a TPU needs libtpu, which is not installed "
      f"(pip install -e '.[tpu]': libtpu==0.0.42.1, the version jax {jax.__version__} pins)"
    )
  # Off a TPU VM: tell libtpu not to look for the VM's metadata server or worker list, and not to
  # take its one-process-per-host lock (/tmp/libtpu_lockfile): compile-only devices drive no
  # hardware, so several compiles may run at once.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except  # JaxRuntimeError, RuntimeError
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if why.startswith("INVALID_ARGUMENT"):
      raise ConfigError(
        f"--topology={topology!r} is not a TPU topology libtpu knows ({why}); "
        f"e.g. {TOPOLOGY_EXAMPLES}"
      ) from e
    raise ConfigError(f"--topology={topology!r}: libtpu could not describe it: {why}") from e


def target_devices(topology: str) -> tuple[list, int | None, str]:
  """(devices, HBM bytes per device or None, chip name) of `topology`."""
  if topology in ("", "local"):
    devices = jax.devices()
    kind = devices[0].device_kind
    limit = None
    stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
      limit = int(stats["bytes_limit"])
    chip, gib = HBM_GIB.get(kind, (kind, None))
    if limit is None and gib is not None:
      limit = gib * GIB
    return devices, limit, chip
  if ":" not in topology:
    raise ConfigError(
      f"--topology={topology!r}: expected <chip>:<shape> or local, e.g. {TOPOLOGY_EXAMPLES}"
    )
  devices = _tpu_devices(topology)
  chip, gib = HBM_GIB.get(devices[0].device_kind, (devices[0].device_kind, None))
  return devices, None if gib is None else gib * GIB, chip


def compile_step(config: ml_collections.ConfigDict, topology: str) -> Report:
  """Lowers and compiles the train step for `topology`; nothing is initialised or run."""
  config_check.check(config)
  devices, hbm, chip = target_devices(topology)
  mesh = sharding.make_mesh(devices, axes=config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)

  prog = program.build(config, mesh)  # the trainer's own program: loss layout, accumulation
  state_in = prog.abstract_state
  batch_shard = prog.batch_sharding
  batch_in = {
    k: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype, sharding=batch_shard)
    for k, (shape, dtype) in batch_lib.spec(config.data.image_size, config.data.max_length).items()
  }
  # The step key is closed over as raw key data, so no array of the host backend ends up in a
  # program compiled for other devices.
  step_fn = prog.jit_step(portable_key=True)
  report = functools.partial(
    Report,
    target=topology or "local",
    devices=len(devices),
    device_kind=devices[0].device_kind,
    mesh=dict(mesh.shape),
    batch_size=config.batch_size,
    hbm=hbm,
    chip=chip,
  )
  t0 = time.perf_counter()
  lowered = step_fn.lower(state_in, batch_in)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler itself refuses a program whose temporaries exceed HBM: report that
    # (its figure, and the per-device arguments from the shardings), not a traceback.
    m = re.search(r"RESOURCE_EXHAUSTED:.*?temporaries \(([0-9.]+)([KMGT])\)", str(e))
    if not m:
      raise
    state_bytes = _per_device_bytes(state_in)

    def host_step(st, b):  # the same step with the dense loss, for the host's cost analysis
      loss_fn = prog.family.make_loss(config)
      return step_lib.train_step(
        st, b, model=prog.model, tx=prog.tx, loss_fn=loss_fn, mask=prog.mask, rng=prog.step_rng
      )

    return report(
      arguments=state_bytes + _per_device_bytes(batch_in),
      outputs=state_bytes,
      aliased=state_bytes,
      temporaries=int(float(m[1]) * 2 ** (10 * "KMGT".index(m[2]) + 10)),
      code=0,
      # FLOPs of the unpartitioned program (the global batch) by the host backend's HLO cost
      # analysis (a program lowered for compile-only devices has none), split evenly.
      flops_per_device=_flops(
        jax.jit(host_step).lower(*_unsharded(state_in, batch_in)).cost_analysis()
      )
      / len(devices),
      compile_s=time.perf_counter() - t0,
      note="the compiler stopped: " + str(e).strip().splitlines()[0][:300],
    )
  compile_s = time.perf_counter() - t0

  mem = compiled.memory_analysis()
  return report(
    arguments=int(mem.argument_size_in_bytes),
    outputs=int(mem.output_size_in_bytes),
    aliased=int(mem.alias_size_in_bytes),
    temporaries=int(mem.temp_size_in_bytes),
    code=int(mem.generated_code_size_in_bytes),
    flops_per_device=_flops(compiled.cost_analysis()),
    compile_s=compile_s,
  )


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _unsharded(*trees):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trees)


def _per_device_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )
