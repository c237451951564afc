"""docs/pod.md's walkthrough, run as written against a real GCS emulator (slow: ~3 min).

Its commands are read from the page (the blocks after `<!-- pod-walkthrough: NAME -->`) and
run in order with the stand-ins of a CPU machine: the emulator's bucket for `gs://my-bucket`, a
fixture tree in the MIMIC-CXR-JPG layout for `/data/mimic-cxr-jpg`, prepared at 64 px, the
smoke model, and a few steps. The launch line's MAIN_FLAGS are what each pod worker runs
(`python -m medvl_jax.main MAIN_FLAGS`); they run here on one host.
"""

import json
import re
import shlex

import pytest

from data_pipelines import common
from medvl_jax import paths
from tests import fixtures_layout as fl
from tests.conftest import REPO
from tests.end_to_end.test_bucket_workdir import run_cli

pytest_plugins = ("tests.conftest_gcs",)

PAGE = REPO / "docs" / "pod.md"
SIZE = 64  # the smoke config's data.image_size
STEPS = 4


def walkthrough() -> dict[str, list[str]]:
  """The page's walkthrough commands by name, as argument lists."""
  blocks = re.findall(r"<!-- pod-walkthrough: (\w+) -->\n```\n(.*?)\n```", PAGE.read_text(), re.S)
  return {name: shlex.split(body) for name, body in blocks}


def stand_in(args: list[str], bucket: str, manual: dict[str, str]) -> list[str]:
  """The command for this machine: the emulator's bucket, fixture trees, the smoke model."""
  swap = {
    "--config=configs/convirt.py": "--config=configs/convirt.py:smoke",
    "--config.data.builder_config=paired": "--config.data.builder_config="
    + common.config_name("paired", SIZE),
  }
  out = []
  for a in args:
    a = a.replace("gs://my-bucket", bucket)
    for published, fixture in manual.items():
      a = a.replace(published, fixture)
    if not a.startswith("--config.batch_size="):  # the pod's global batch; the smoke one here
      out.append(swap.get(a, a))
  if "--cfg=dataset=chexpert" in args:  # the probe reads the 64 px build
    out += [f"--cfg=builder_config={common.config_name('u_ignore', SIZE)}", "--cfg=n_boot=20"]
  return out


@pytest.mark.slow
def test_the_pod_walkthrough_runs_as_written(gcs_env, sample_data_dir, tmp_path):
  from tests import conftest_gcs  # pylint: disable=g-import-not-at-top

  steps = walkthrough()
  assert list(steps) == ["prepare", "prepare_probe", "launch", "export", "evaluate"]
  bucket = conftest_gcs.new_bucket(gcs_env)
  manual = {
    "/data/mimic-cxr-jpg": str(fl.mimic_cxr(sample_data_dir, tmp_path / "mimic")),
    "/data/chexpert": str(fl.chexpert(sample_data_dir, tmp_path / "chexpert")),
  }

  def run(args: list[str]):
    assert args[:2] == ["python", "-m"], args
    proc = run_cli(args[2], *stand_in(args[3:], bucket, manual), emulator=gcs_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  for name in ("prepare", "prepare_probe"):
    run(steps[name] + [f"--image_size={SIZE}", f"--staging_dir={tmp_path / name}"])

  launch = steps["launch"]
  assert launch[0] == "launch/tpu_pod.sh" and "all" in launch
  main_flags = launch[launch.index("all") + 1 :]
  few_steps = [
    f"--config.total_steps={STEPS}",
    f"--config.eval_every={STEPS}",
    f"--config.checkpoint_every={STEPS}",
  ]
  train = ["python", "-m", "medvl_jax.main", *main_flags, *few_steps]
  run(train)
  again = run(train)  # step 5, "resume after a preemption", once the run has finished
  workdir = bucket + "/runs/convirt"
  assert f"run already complete at step {STEPS}" in again.stderr

  exported = run(steps["export"])
  assert f"exported step {STEPS} of {workdir}" in exported.stdout
  assert paths.exists(bucket + "/exported/convirt/export.json")

  run(steps["evaluate"])
  metrics = json.loads(paths.read_text(f"{workdir}/eval/linear_probe-step{STEPS}/metrics.json"))
  assert metrics["task"] == "linear_probe" and metrics["step"] == STEPS
  assert 0 <= metrics["metrics"]["linear_probe/auc_100pct"] <= 1
