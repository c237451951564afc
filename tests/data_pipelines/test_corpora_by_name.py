"""Issue 6 item 3: the trainer and the evaluators take any registered corpus by name.

ConVIRT pretrains on `mimic_cxr` (a fixture tree in the MIMIC-CXR-JPG layout, prepared at 64
px), and that checkpoint's linear probe runs on `chexpert` (CheXpert-v1.0-small layout, 64 px,
uncertain labels kept as -1 and masked) through the real CLIs; the multi-label and multi-class
probe paths score 1.0 on oracle (label-derived) features.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from data_pipelines import common, prepare
from medvl_jax.errors import ConfigError, DataError
from medvl_jax.evaluate import datasets, linear_probe
from tests import fixtures_layout as fl
from tests.conftest import REPO, run_main

SIZE = 64  # The smoke config's data.image_size.
MIMIC_CONFIG = common.config_name("paired", SIZE)
CHEXPERT_CONFIG = common.config_name("u_ignore", SIZE)
STEPS = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  """One tfds data dir holding mimic_cxr/paired_64 and chexpert/u_ignore_64, prepared as
  `python -m data_pipelines.prepare` prepares them (with their random-access copies)."""
  out = str(tmp_path_factory.mktemp("corpora_tfds"))
  mimic = fl.mimic_cxr(sample_data_dir, tmp_path_factory.mktemp("mimic"))
  prepare.prepare("mimic_cxr", str(mimic), data_dir=out, image_size=SIZE, config="paired")
  chexpert = fl.chexpert(sample_data_dir, tmp_path_factory.mktemp("chexpert"))
  prepare.prepare("chexpert", str(chexpert), data_dir=out, image_size=SIZE, config="u_ignore")
  return pathlib.Path(out)


@pytest.fixture(scope="module")
def mimic_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("mimic_run")
  proc = run_main(
    "--config=configs/convirt.py:smoke",
    f"--workdir={workdir}",
    "--config.data.name=mimic_cxr",
    f"--config.data.builder_config={MIMIC_CONFIG}",
    f"--config.data.data_dir={data_dir}",
    f"--config.total_steps={STEPS}",
    f"--config.eval_every={STEPS}",
    f"--config.checkpoint_every={STEPS}",
  )
  return workdir, proc


@pytest.mark.slow  # a training run on a second corpus: ~30 s
def test_convirt_trains_on_mimic_cxr_by_name(mimic_run):
  workdir, proc = mimic_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["name"] == "mimic_cxr"
  assert config["data"]["builder_config"] == MIMIC_CONFIG


def test_dataset_loader_reads_chexpert(data_dir):
  kw = dict(builder_config=CHEXPERT_CONFIG, data_dir=str(data_dir), image_size=SIZE, resize=72)
  full = datasets.load_split("chexpert", "train", **kw)
  frontal = datasets.load_split("chexpert", "train", frontal_only=True, **kw)
  assert full["image"].shape[1:] == (SIZE, SIZE, 1) and full["image"].dtype == np.uint8
  assert full["labels"].shape == (len(full["image"]), 14)
  assert set(np.unique(full["labels"])) <= {-1, 0, 1} and (full["labels"] == -1).any()
  assert len(full["patient_id"]) == len(full["image"])
  assert all(p.startswith("patient") for p in full["patient_id"])
  assert 0 < len(frontal["image"]) < len(full["image"])
  assert "Lateral" not in set(frontal["view"])
  assert datasets.label_names("chexpert") == common.CHEXPERT_LABELS
  assert datasets.default_task_type("covidx") == "multiclass"


def test_dataset_errors(data_dir):
  with pytest.raises(ConfigError, match="not a known dataset"):
    linear_probe.Evaluator(None, dataset="no_such_corpus")
  with pytest.raises(ConfigError, match="not a config of chexpert"):
    linear_probe.Evaluator(
      None, dataset="chexpert", builder_config="u_maybe", data_dir=str(data_dir)
    )
  with pytest.raises(DataError, match="not prepared"):
    linear_probe.Evaluator(
      None, dataset="nih14", builder_config="default_64", data_dir=str(data_dir)
    )
  with pytest.raises(ConfigError, match="task_type"):
    linear_probe.Evaluator(
      None,
      dataset="chexpert",
      builder_config=CHEXPERT_CONFIG,
      data_dir=str(data_dir),
      task_type="regression",
    )


@pytest.mark.slow  # a training run on a second corpus: ~30 s
def test_linear_probe_cli_on_chexpert(mimic_run, data_dir, tmp_path):
  workdir, proc = mimic_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "probe"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "medvl_jax.evaluate",
      f"--workdir={workdir}",
      "--task=linear_probe",
      f"--out={out}",
      "--cfg=dataset=chexpert",
      f"--cfg=builder_config={CHEXPERT_CONFIG}",
      f"--cfg=data_dir={data_dir}",
      "--cfg=n_boot=50",
      "--cfg=seeds=(0, 1)",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "metrics.json").read_text())
  m = result["metrics"]
  assert result["cfg"]["dataset"] == "chexpert" and result["step"] == STEPS
  for tag in ("1pct", "10pct", "100pct"):
    per_class = [
      m[f"linear_probe/auc_{tag}/{linear_probe.slug(n)}"] for n in common.CHEXPERT_LABELS
    ]
    assert all(v is None or 0 <= v <= 1 for v in per_class), per_class
    defined = [v for v in per_class if v is not None]
    assert defined, f"no class has test positives and negatives at {tag}"
    assert 0 <= m[f"linear_probe/auc_{tag}"] <= 1
    assert m[f"linear_probe/auc_{tag}_std"] >= 0
  assert m["linear_probe/n_train"] > 0 and m["linear_probe/n_test"] > 0
  with Image.open(out / "linear_probe_roc.png") as im:
    assert im.size[0] > 100


# ----------------------------------------------------------------------------- no model
def _oracle(n_train=120, n_test=60, n_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  y = (rng.random((n_train + n_test, n_classes)) < 0.3).astype(np.int32)
  y[:, -1] = 0  # A class without positives anywhere: undefined, not 0.5.
  x = y * 4.0 + rng.normal(0, 0.05, y.shape)  # Label-derived feature.
  x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
  patients = np.array([f"p{i // 2}" for i in range(n_test)])
  return x[:n_train], y[:n_train], x[n_train:], y[n_train:], patients


def test_oracle_multilabel_macro_auc_is_one():
  x_tr, y_tr, x_te, y_te, patients = _oracle()
  y_tr[3, 0] = -1  # An uncertain train label: masked, not a negative.
  y_te[[1, 2], 1] = -1
  names = [f"Class {k}" for k in range(5)]
  values, details = linear_probe.probe_labels(
    (x_tr, y_tr), (x_te, y_te), patients, names=names, fractions=(0.1, 1.0), seeds=(0, 1), n_boot=50
  )
  m = dict(values)
  for tag in ("10pct", "100pct"):
    assert m[f"linear_probe/auc_{tag}"] == pytest.approx(1.0)
    assert m[f"linear_probe/auc_{tag}_std"] == pytest.approx(0.0)
    assert m[f"linear_probe/auc_{tag}_ci_lo"] == pytest.approx(1.0)
    for k in range(4):
      assert m[f"linear_probe/auc_{tag}/class_{k}"] == pytest.approx(1.0)
    assert m[f"linear_probe/auc_{tag}/class_4"] is None
  assert len(details["curves"]) == 4


def test_oracle_multiclass_accuracy_is_one():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 3, 150)
  y = np.eye(3, dtype=np.int32)[ids]
  x = y * 4.0 + rng.normal(0, 0.05, y.shape)
  patients = np.array([f"p{i}" for i in range(50)])
  values, _ = linear_probe.probe_labels(
    (x[:100], y[:100]),
    (x[100:], y[100:]),
    patients,
    task_type="multiclass",
    names=("normal", "pneumonia", "COVID-19"),
    fractions=(0.1, 1.0),
    seeds=(0, 1),
    n_boot=50,
  )
  m = dict(values)
  for tag in ("10pct", "100pct"):
    assert m[f"linear_probe/acc_{tag}"] == pytest.approx(1.0)
    assert m[f"linear_probe/auc_{tag}/covid_19"] == pytest.approx(1.0)
