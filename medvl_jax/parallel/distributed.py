"""Multi-process start-up: one `initialize_distributed(config)` for every place the job runs.

What is detected, first match wins (`detect` is a pure function of the environment):
  explicit  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (launch/local_multihost.sh,
            or any cluster without a scheduler JAX knows); MEDVL_CPU_COLLECTIVES=1 selects gloo
            collectives for CPU devices (the multi-process CPU simulation).
  slurm     a SLURM step with more than one task (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
            SLURM_PROCID, SLURM_LOCALID: the variables JAX's own SlurmCluster reads);
            `jax.distributed.initialize()` derives the coordinator (first node of the step, port
            from the job id), process count and id itself (launch/slurm_gpu.sbatch).
  tpu       a Cloud TPU VM (TPU chips on the PCI bus) whose slice has several hosts, or whose host
            count is unknown here (no TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES: GCE's metadata
            server knows it); `jax.distributed.initialize()` reads the metadata server.
  single    anything else, or one of the above with one process: nothing to initialise.
Each process logs one line naming what was detected.
"""

from collections.abc import Mapping
import dataclasses
import os
import sys

from absl import logging

from medvl_jax.errors import ConfigError

SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True)
class Detected:
  kind: str  # 'single' | 'explicit' | 'slurm' | 'tpu'
  description: str  # what the log line says
  coordinator: str | None = None  # explicit only; the others let JAX derive it
  num_processes: int | None = None
  process_id: int | None = None
  cpu_collectives: str | None = None  # 'gloo' for the CPU simulation
  local_device_ids: tuple[int, ...] | None = None  # slurm, one task per host: all its GPUs


def _int_var(env: Mapping[str, str], name: str, why: str) -> int:
  value = env.get(name)
  if value is None or not value.strip().lstrip("-").isdigit():
    raise ConfigError(f"environment variable {name}={value!r}: an integer is needed ({why})")
  return int(value)


def _hosts(value: str | None) -> list[str]:
  return [h for h in (value or "").split(",") if h.strip()]


def detect(env: Mapping[str, str], tpu_chips: int = 0) -> Detected:
  """What kind of multi-process run `env` describes (no initialisation, no I/O).

  Args:
    env: the process environment (os.environ).
    tpu_chips: TPU chips attached to this host (0 off TPU VMs).

  Raises:
    ConfigError: an explicit coordinator without a valid process count or id.
  """
  coordinator = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
  if coordinator:
    why = f"JAX_COORDINATOR_ADDRESS={coordinator} is set"
    n = _int_var(env, "JAX_NUM_PROCESSES", why)
    i = _int_var(env, "JAX_PROCESS_ID", why)
    if n < 1 or not 0 <= i < n:
      raise ConfigError(
        f"environment: JAX_PROCESS_ID={i} is not in 0..JAX_NUM_PROCESSES-1 (JAX_NUM_PROCESSES={n})"
      )
    gloo = "gloo" if env.get("MEDVL_CPU_COLLECTIVES", "").strip() not in ("", "0") else None
    if n == 1:
      return Detected("single", "single process (JAX_NUM_PROCESSES=1)")
    return Detected(
      "explicit",
      f"explicit coordinator {coordinator} from JAX_* variables, process {i} of {n}"
      + (", gloo CPU collectives" if gloo else ""),
      coordinator=coordinator,
      num_processes=n,
      process_id=i,
      cpu_collectives=gloo,
    )
  if all(v in env for v in SLURM_VARS):
    n = _int_var(env, "SLURM_NTASKS", "inside a SLURM step")
    i = _int_var(env, "SLURM_PROCID", "inside a SLURM step")
    if n > 1:
      # JAX gives each SLURM task one GPU (SLURM_LOCALID) unless told otherwise; with one task
      # per host (launch/slurm_gpu.sbatch) that task drives every GPU of its host.
      nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or ""
      gpus = env.get("SLURM_GPUS_ON_NODE", "")
      devices = None
      if nodes.isdigit() and gpus.isdigit() and int(gpus) > 0 and n == int(nodes):
        devices = tuple(range(int(gpus)))
      return Detected(
        "slurm",
        f"SLURM job {env['SLURM_JOB_ID']} on {env['SLURM_STEP_NODELIST']}, task {i} of {n} "
        "(coordinator: the step's first node)"
        + (f", {len(devices)} GPUs per task" if devices else ", one device per task"),
        num_processes=n,
        process_id=i,
        local_device_ids=devices,
      )
    return Detected("single", f"single process (SLURM job {env['SLURM_JOB_ID']}, one task)")
  if tpu_chips > 0:
    hosts = _hosts(env.get("TPU_PROCESS_ADDRESSES")) or _hosts(env.get("TPU_WORKER_HOSTNAMES"))
    if len(hosts) == 1:
      return Detected("single", f"single TPU host ({tpu_chips} chips)")
    where = (
      f"{len(hosts)} hosts from the environment" if hosts else "hosts from the metadata server"
    )
    return Detected(
      "tpu", f"Cloud TPU VM ({tpu_chips} chips here, {where})", num_processes=len(hosts) or None
    )
  return Detected("single", "single process (no coordinator, SLURM step or TPU pod found)")


def _tpu_chips() -> int:
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except (ImportError, OSError, AttributeError):  # private API moved, or /sys unreadable
    return 0


def initialize_distributed(config, env: Mapping[str, str] | None = None) -> Detected:
  """Joins this process to the job's other processes (before any JAX computation).

  `config.distributed.initialization_timeout` (seconds) bounds the wait for the other
  processes. Returns what was detected.
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ if env is None else env
  found = detect(env, tpu_chips=_tpu_chips())
  timeout = int(config.distributed.initialization_timeout)
  if found.kind == "explicit":
    if found.cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", found.cpu_collectives)
    jax.distributed.initialize(
      coordinator_address=found.coordinator,
      num_processes=found.num_processes,
      process_id=found.process_id,
      initialization_timeout=timeout,
    )
  elif found.kind in ("slurm", "tpu"):
    # JAX's own cluster detection (SlurmCluster / GceTpuCluster, GkeTpuCluster).
    jax.distributed.initialize(
      local_device_ids=list(found.local_device_ids) if found.local_device_ids else None,
      initialization_timeout=timeout,
    )
  logging.info("distributed: %s", found.description)
  return found


def finish() -> None:
  """After a run that ended normally on every process: waits for all of them, then leaves the
  process group. Without it each process leaves at interpreter exit, in whatever order they
  end (process 0 last: it releases the workdir's lease), and JAX's shutdown at exit can abort
  a process whose peers are already gone."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("medvl_jax: run ended")
    jax.distributed.shutdown()


def describe(env: Mapping[str, str], tpu_chips: int = 0) -> str:
  """One line: what `initialize_distributed` would detect here, with JAX's coordinator for SLURM
  (the launch scripts print it for every task before the job starts)."""
  found = detect(env, tpu_chips)
  line = f"{found.kind}: {found.description}"
  if found.kind == "slurm":
    try:  # JAX's own derivation (first node of the step, port from the job id)
      from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top

      saved = {k: os.environ.get(k) for k in SLURM_VARS}
      os.environ.update({k: env[k] for k in SLURM_VARS})
      try:
        line += (
          f"; JAX coordinator {slurm_cluster.SlurmCluster.get_coordinator_address(None, None)}"
        )
      finally:
        for k, v in saved.items():
          if v is None:
            os.environ.pop(k, None)
          else:
            os.environ[k] = v
    except ImportError:
      pass
  return line


def _main(argv: list[str]) -> int:
  """`python -m medvl_jax.parallel.distributed`: prints `describe` of this process's
  environment. It reads the environment only; the one flag is --help (also -h)."""
  if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(
      f"{__doc__}\nUsage: python -m medvl_jax.parallel.distributed\n\n"
      "Prints what initialize_distributed would detect here, from the environment only\n"
      "(JAX_*, MEDVL_CPU_COLLECTIVES, SLURM_*, TPU_*).\n\n"
      "flags:\n  --help: show this help (also -h)"
    )
    return 0
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (see --help)", file=sys.stderr)
    return 2
  try:
    print(describe(os.environ, _tpu_chips()), flush=True)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv))
