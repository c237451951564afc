"""Export and evaluate on a run with a damaged checkpoint (`run_dir.restore_variables`): the
damage kinds training falls back from, on copies of the session's smoke run (real Orbax steps 20
and 30), through the real `python -m medvl_jax.export` and `python -m medvl_jax.evaluate`.

Without --step the newest intact step is used, with one warning line naming the damaged step and
its cause; --step naming a damaged step is one error line listing the intact steps; readers
move and delete nothing. A checkpoint that is intact but of another model keeps its message.
"""

import hashlib
import json
import pathlib
import shutil

import pytest

from medvl_jax import families
from medvl_jax.ckpt import run_dir
from medvl_jax.errors import CheckpointError
from tests.ckpt import damage
from tests.conftest import run_eval, run_export


def _copy_run(smoke_run, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns("eval", "discarded-*"))
  return workdir


def _tree(workdir: pathlib.Path) -> dict[str, str]:
  """Every file under `workdir` but its evaluation outputs: its SHA-256."""
  return {
    str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(workdir.rglob("*"))
    if p.is_file() and p.relative_to(workdir).parts[0] != "eval"
  }


def _one_warning(proc, *parts) -> str:
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: ")]
  assert len(warnings) == 1, proc.stderr[-3000:]
  for part in parts:
    assert part in warnings[0], warnings[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return warnings[0]


def _one_error(proc, *parts) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
  for part in parts:
    assert part in errors[0], errors[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("kind", list(damage.DAMAGES))
def test_export_falls_back_to_the_newest_intact_step(smoke_run, tmp_path, kind):
  workdir = _copy_run(smoke_run, tmp_path)
  hurt, cause = damage.DAMAGES[kind]
  hurt(workdir / "checkpoints" / "30")
  before = _tree(workdir)
  out = tmp_path / "out"
  proc = run_export(f"--workdir={workdir}", f"--out={out}")
  _one_warning(proc, "checkpoint step 30", "is damaged", cause, "using step 20")
  assert json.loads((out / "export.json").read_text())["step"] == 20
  assert f"exported step 20 of {workdir}" in proc.stdout
  assert _tree(workdir) == before  # a reader moves and deletes nothing


def test_export_of_a_damaged_step_names_the_intact_ones(smoke_run, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  damage.truncate_arrays(workdir / "checkpoints" / "30")
  out = tmp_path / "out"
  proc = run_export(f"--workdir={workdir}", f"--out={out}", "--step=30")
  _one_error(proc, "checkpoint step 30", "is damaged", "OUT_OF_RANGE", "intact steps: 20", "--step")
  assert not out.exists()
  assert (workdir / "checkpoints" / "30").is_dir()


def test_export_with_no_intact_step(smoke_run, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  damage.garbage_metadata(workdir / "checkpoints" / "30")
  damage.missing_data_item(workdir / "checkpoints" / "20")
  out = tmp_path / "out"
  proc = run_export(f"--workdir={workdir}", f"--out={out}")
  _one_error(proc, "no intact checkpoint", "step 30: state/_METADATA", "step 20: item 'data'")
  assert not out.exists()


@pytest.mark.slow  # an evaluation process: ~20 s
def test_evaluate_falls_back_to_the_newest_intact_step(smoke_run, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  hurt, cause = damage.DAMAGES["deleted array file"]
  hurt(workdir / "checkpoints" / "30")
  before = _tree(workdir)
  proc = run_eval(f"--workdir={workdir}", "--task=linear_probe", "--cfg=n_boot=100")
  _one_warning(proc, "checkpoint step 30", "is damaged", cause, "using step 20")
  result = json.loads((workdir / "eval" / "linear_probe-step20" / "metrics.json").read_text())
  assert result["step"] == 20
  assert _tree(workdir) == before


def test_evaluate_of_a_damaged_step_names_the_intact_ones(smoke_run, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  damage.empty_step_dir(workdir / "checkpoints" / "30")
  proc = run_eval(f"--workdir={workdir}", "--task=linear_probe", "--step=30")
  _one_error(proc, "checkpoint step 30", "the step directory is empty", "intact steps: 20")
  assert not list(workdir.rglob("metrics.json"))


def test_a_checkpoint_of_another_model_is_not_called_damaged(smoke_run):
  """Intact, but the config asks for other shapes: the 'does not fit' message, no fallback."""
  config = run_dir.load_run_config(smoke_run[0])
  config.model.projection_dim = 64
  model = families.get(config.model.name).build(config.model)
  with pytest.raises(CheckpointError, match="checkpoints/30: does not fit the model") as e:
    run_dir.restore_variables(smoke_run[0], config, model)
  assert "damaged" not in str(e.value)


def test_a_checkpoint_without_some_of_the_model_is_not_restored(smoke_run):
  """A model with one more text layer: the checkpoint lacks its arrays, which a partial restore
  would hand back as placeholders; named as missing instead."""
  config = run_dir.load_run_config(smoke_run[0])
  config.model.text.num_layers += 1
  model = families.get(config.model.name).build(config.model)
  with pytest.raises(
    CheckpointError, match=r"does not fit the model .*\['layer'\]\['2'\].* missing"
  ):
    run_dir.restore_variables(smoke_run[0], config, model)
