"""Multi-process detection (medvl_jax.parallel.distributed.detect) on environment dicts, and
the CLI's one-line error for a malformed explicit set-up. No process group is started here: the
real 2-process runs are tests/data/test_read_only_data_dir.py and tests/parallel/test_scale.py."""

import pytest

from medvl_jax.errors import ConfigError
from medvl_jax.parallel import distributed
from tests.conftest import run_main, smoke_args

SLURM = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "gpu[003-004]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "0",
  "SLURM_STEP_NUM_NODES": "2",
  "SLURM_GPUS_ON_NODE": "8",
}


def test_nothing_set_is_a_single_process():
  found = distributed.detect({})
  assert found.kind == "single"
  assert "single process" in found.description


def test_explicit_coordinator_with_gloo():
  found = distributed.detect(
    {
      "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1",
      "MEDVL_CPU_COLLECTIVES": "1",
    }
  )
  assert (found.kind, found.coordinator, found.num_processes, found.process_id) == (
    "explicit",
    "127.0.0.1:1234",
    2,
    1,
  )
  assert found.cpu_collectives == "gloo"
  assert "127.0.0.1:1234" in found.description and "process 1 of 2" in found.description


def test_explicit_without_gloo_and_one_process():
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"}
  assert distributed.detect(env).cpu_collectives is None
  assert distributed.detect(dict(env, JAX_NUM_PROCESSES="1")).kind == "single"


@pytest.mark.parametrize(
  "env, message",
  [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES=None"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
    (
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
      "JAX_PROCESS_ID=2 is not in 0..JAX_NUM_PROCESSES-1",
    ),
  ],
)
def test_explicit_errors_name_the_variable(env, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
    distributed.detect(env)


def test_slurm_one_task_per_host_drives_all_its_gpus():
  found = distributed.detect(SLURM)
  assert found.kind == "slurm"
  assert (found.num_processes, found.process_id) == (2, 1)
  assert found.local_device_ids == tuple(range(8))
  assert found.coordinator is None  # JAX derives it: first node of the step, port from job id
  assert "SLURM job 4242" in found.description and "8 GPUs per task" in found.description


def test_slurm_one_task_per_gpu_leaves_jax_default():
  found = distributed.detect(dict(SLURM, SLURM_NTASKS="16"))
  assert found.kind == "slurm" and found.local_device_ids is None


def test_slurm_single_task_and_explicit_wins():
  assert distributed.detect(dict(SLURM, SLURM_NTASKS="1")).kind == "single"
  explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
  assert distributed.detect(dict(SLURM, **explicit)).kind == "explicit"
  # An incomplete SLURM environment (e.g. salloc without srun) is not a SLURM step.
  partial = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.detect(partial).kind == "single"


def test_tpu_vm():
  assert distributed.detect({}, tpu_chips=4).kind == "tpu"  # hosts: metadata server
  multi = distributed.detect({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, tpu_chips=4)
  assert multi.kind == "tpu" and multi.num_processes == 2 and "2 hosts" in multi.description
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}, tpu_chips=8).kind == "single"
  # Without TPU chips the TPU variables alone mean nothing.
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}).kind == "single"


def test_cli_bad_process_id_is_one_line(tmp_path, tfds_dir):
  proc = run_main(
    *smoke_args(tmp_path / "w", tfds_dir),
    env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"},
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: environment variable JAX_PROCESS_ID='x': an integer is needed "
    "(JAX_COORDINATOR_ADDRESS=127.0.0.1:1 is set)"
  )
  assert "Traceback" not in proc.stderr
