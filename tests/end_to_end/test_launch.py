"""launch/: the TPU pod script's dry run (every gcloud command printed, none run, the same
command on every worker) and the SLURM batch script (syntax, and the environment each task sees
mapped to JAX's multi-process set-up)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

POD = ["bash", "launch/tpu_pod.sh"]
MAIN_FLAGS = ["--config=configs/convirt.py", "--config.batch_size=4096", "--workdir=/mnt/runs/c"]


def _fake_bin(tmp_path: pathlib.Path, name: str, body: str) -> dict:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  tool = bin_dir / name
  tool.write_text("#!/usr/bin/env bash\n" + body)
  tool.chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def _pod(*args, env=None):
  return subprocess.run([*POD, *args], cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("accelerator, workers", [("v5litepod-16", 4), ("v4-32", 4), ("v6e-8", 1)])
def test_tpu_pod_dry_run_prints_everything_and_runs_nothing(tmp_path, accelerator, workers):
  # A gcloud on PATH that would leave a trace if it were called.
  marker = tmp_path / "gcloud_was_called"
  env = _fake_bin(tmp_path, "gcloud", f'touch "{marker}"\n')
  proc = _pod(
    "--dry-run", "--name=cxr", "--zone=us-west4-a", f"--accelerator={accelerator}", "all",
    *MAIN_FLAGS, env=env,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert not marker.exists()
  out = proc.stdout
  commands = [line for line in out.splitlines() if line.startswith("gcloud ")]
  verbs = [line.split()[4] for line in commands]
  assert verbs == ["create", "ssh", "scp", "ssh", "ssh"], commands
  assert f"--accelerator-type={accelerator}" in commands[0]
  assert all("--worker=all" in c for c in commands[1:])
  # Every worker named, each running the same main command with the same config.
  runs = re.findall(r"^#   worker (\d+)/(\d+): (.*medvl_jax\.main.*)$", out, flags=re.M)
  assert [int(w) for w, _, _ in runs] == list(range(workers))
  assert {int(n) for _, n, _ in runs} == {workers}
  assert len({cmd for _, _, cmd in runs}) == 1
  assert all(flag in runs[0][2] for flag in MAIN_FLAGS)
  assert "medvl_jax.main --config=configs/convirt.py" in commands[-1]


def test_tpu_pod_single_steps_and_errors():
  base = ["--dry-run", "--name=cxr", "--zone=z", "--accelerator=v5p-16"]
  assert _pod(*base, "delete").stdout.splitlines()[-1] == (
    "gcloud compute tpus tpu-vm delete cxr --zone=z --quiet"
  )
  assert "--worker=0" in _pod(*base, "tail").stdout
  for args, message in [
    ((*base, "launch"), "STEP must be create, copy, run, tail, delete or all (got 'launch')"),
    (("--dry-run", "--zone=z", "--accelerator=v4-8", "create"), "--name=NAME is required"),
    (("--name=a", "--zone=z", "--accelerator=v9-4", "create"), "unknown --accelerator=v9-4"),
    ((*base, "run"), "run needs MAIN_FLAGS"),
  ]:
    proc = _pod(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_slurm_sbatch_syntax():
  proc = subprocess.run(["bash", "-n", "launch/slurm_gpu.sbatch"], cwd=REPO, capture_output=True)
  assert proc.returncode == 0, proc.stderr
  text = (REPO / "launch" / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in text  # one task per GPU host


# What srun sets for each task of a 2-host step (gpu003, gpu004; 8 GPUs each, one task per host).
FAKE_SRUN = r"""
while [[ "${1:-}" == --* ]]; do shift; done
if [[ "$*" == *medvl_jax.parallel.distributed* ]]; then
  for task in 0 1; do
    SLURM_JOB_ID=4242 SLURM_STEP_NODELIST='gpu[003-004]' SLURM_NTASKS=2 SLURM_PROCID=$task \
      SLURM_LOCALID=0 SLURM_STEP_NUM_NODES=2 SLURM_GPUS_ON_NODE=8 "$@"
  done
else
  echo "main: $*"
fi
"""


def test_slurm_sbatch_environment_mapping(tmp_path):
  env = _fake_bin(tmp_path, "srun", FAKE_SRUN)
  env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), SLURM_SUBMIT_DIR=str(REPO))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  proc = subprocess.run(
    ["bash", "launch/slurm_gpu.sbatch", *MAIN_FLAGS],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  # JAX's SLURM detection: coordinator = first node of the step, port 61440 + job id % 4096.
  for task, line in enumerate(lines[:2]):
    assert line.startswith(f"slurm: SLURM job 4242 on gpu[003-004], task {task} of 2"), line
    assert "8 GPUs per task" in line and line.endswith("JAX coordinator gpu003:61586"), line
  assert lines[2] == f"main: {sys.executable} -m medvl_jax.main {' '.join(MAIN_FLAGS)}"
