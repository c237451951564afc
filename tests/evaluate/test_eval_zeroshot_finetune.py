"""Zero-shot classification and fine-tuning: an oracle encoder (no model) through the real
evaluator, independent scores (scikit-learn), and both tasks end to end through the CLI on a
real smoke checkpoint of the bundled sample."""

import json
import pathlib
import types

import jax
import numpy as np
from PIL import Image
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from medvl_jax import evaluate
from medvl_jax.evaluate import features, finetune, runs, zeroshot
from tests.conftest import SHORT_STEPS, run_eval

STEPS = SHORT_STEPS


# ----------------------------------------------------------------------------- oracle
class OracleEncoders:
  """Label-derived embeddings: image pixel [0, 0, 0] holds the class id, an image embeds as
  the one-hot of its class plus noise in other dimensions; prompt j of class c embeds as
  one-hot(c) scaled, plus prompt-specific noise (so the mean over prompts matters)."""

  def __init__(self, prompts: dict, dim: int = 8, noise: float = 0.3):
    self.config, self.dim, rng = None, dim, np.random.default_rng(0)
    self.text_z = {}
    for c, sentences in enumerate(prompts.values()):
      for s in sentences:
        z = noise * rng.normal(size=dim)
        z[c] = 1.0 + rng.uniform(0, 3)  # Unnormalised on purpose.
        self.text_z[s] = z
    self.rng = rng

  def texts(self, variables, texts):
    return np.stack([self.text_z[t] for t in texts])

  def images(self, variables, images):
    labels = images[:, 0, 0, 0].astype(int)
    z = 0.05 * self.rng.normal(size=(len(images), self.dim))
    z[np.arange(len(images)), labels] += 1.0
    return z, z


def fake_split(findings, patients):
  n = len(findings)
  return {
    "image": np.zeros((n, 4, 4, 1), np.uint8),
    "finding": np.asarray(findings),
    "patient_id": np.asarray(patients),
    "view": np.full(n, "PA"),
    "text": np.full(n, ""),
    "image_id": np.arange(n).astype(str),
  }


@pytest.fixture
def fake_sample(monkeypatch):
  """Replaces the sample loader; the oracle's class id is written into the pixels."""

  def install(findings, classes, other="other"):
    findings = np.asarray(findings)
    patients = [f"p{i // 2}" for i in range(len(findings))]  # Two images per patient.
    split = fake_split(findings, patients)
    label = zeroshot.assign_classes(findings, classes, other)
    split["image"][:, 0, 0, 0] = np.maximum(label, 0)
    monkeypatch.setattr(features, "load_sample_split", lambda cfg, s, frontal=False: split)
    return label

  return install


STATE = types.SimpleNamespace(params=None, batch_stats=None)


def test_oracle_binary_auc_one_and_equals_sklearn(fake_sample):
  findings = [
    "COVID-19",
    "Pneumonia",
    "COVID-19, ARDS",
    "todo",
    "Klebsiella",
    "No Finding",
    "COVID-19",
    "Legionella",
    "COVID-19",
    "ARDS",
  ]
  label = fake_sample(findings, list(zeroshot.DEFAULT_PROMPTS))
  enc = OracleEncoders(zeroshot.DEFAULT_PROMPTS)
  ev = zeroshot.Evaluator(enc, n_boot=50, splits=("test",))
  m = dict(ev.run(STATE))
  assert m["zeroshot/auc"] == 1.0 and m["zeroshot/acc"] == 1.0
  assert m["zeroshot/auc_ci_lo"] == m["zeroshot/auc_ci_hi"] == 1.0
  assert m["zeroshot/n_test"] == 9  # 'todo' left out.
  assert m["zeroshot/prevalence/COVID-19"] == pytest.approx(4 / 9)

  # Independent scores: mean of normalised prompt embeddings, cosine; noisy images now.
  imgs = np.random.default_rng(1).normal(size=(9, 8))
  enc.images = lambda v, x: (imgs, imgs)
  got = dict(ev.run(STATE))

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  cls = [
    unit(np.mean([unit(enc.text_z[s]) for s in p], 0)) for p in zeroshot.DEFAULT_PROMPTS.values()
  ]
  cos = unit(imgs) @ np.stack(cls).T
  y = (label[np.asarray(findings) != "todo"] == 0).astype(int)
  assert got["zeroshot/auc"] == pytest.approx(roc_auc_score(y, cos[:, 0] - cos[:, 1]))
  assert got["zeroshot/acc"] == pytest.approx(accuracy_score(1 - y, cos.argmax(1)))


def test_oracle_multiclass_accuracy_one(fake_sample, tmp_path):
  prompts = {
    "COVID-19": ["covid a", "covid b"],
    "Pneumocystis": ["pcp"],
    "other": ["other a", "other b", "other c"],
  }
  fake_sample(
    ["COVID-19", "Pneumocystis", "Pneumonia", "COVID-19", "Pneumocystis", "Streptococcus"],
    list(prompts),
  )
  ev = zeroshot.Evaluator(OracleEncoders(prompts), prompts=prompts, n_boot=50)
  m = dict(ev.run(STATE))
  assert m["zeroshot/acc"] == 1.0 and m["zeroshot/auc_macro"] == 1.0
  assert all(m[f"zeroshot/auc/{c}"] == 1.0 for c in prompts)
  assert ev.write_plots(tmp_path) == ["zeroshot_roc.png"]


def test_undefined_auc_is_null(fake_sample, tmp_path):
  fake_sample(["Pneumonia", "Klebsiella", "No Finding", "ARDS"], list(zeroshot.DEFAULT_PROMPTS))
  ev = zeroshot.Evaluator(OracleEncoders(zeroshot.DEFAULT_PROMPTS), n_boot=20)
  m = dict(ev.run(STATE))
  assert m["zeroshot/auc"] is None and m["zeroshot/auc_ci_lo"] is None
  assert m["zeroshot/acc"] == 1.0
  assert json.loads(json.dumps(m))["zeroshot/auc"] is None  # null in metrics.json.
  assert "zeroshot/auc" not in evaluate.run_all([ev], STATE)  # Left out of TensorBoard.
  ev.write_plots(tmp_path)  # No curve: still a PNG, saying so.
  with Image.open(tmp_path / "zeroshot_roc.png") as im:
    im.load()


def test_bad_prompts():
  from medvl_jax.errors import ConfigError

  with pytest.raises(ConfigError, match="at least 2 classes"):
    zeroshot.Evaluator(None, prompts={"a": ["x"]})
  with pytest.raises(ConfigError, match="non-empty list"):
    zeroshot.Evaluator(None, prompts={"a": ["x"], "b": "a string, not a list"})


# ----------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def run_dir(short_run) -> pathlib.Path:
  return short_run


@pytest.fixture(scope="module")
def zeroshot_out(run_dir, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("zs") / "zs"
  proc = run_eval(f"--workdir={run_dir}", "--task=zeroshot", f"--out={out}", "--cfg=n_boot=100")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_cli_zeroshot(zeroshot_out):
  out = zeroshot_out
  result = json.loads((out / "metrics.json").read_text())
  assert result["task"] == "zeroshot" and result["step"] == STEPS
  m = result["metrics"]
  assert 0 <= m["zeroshot/auc_ci_lo"] <= m["zeroshot/auc"] <= m["zeroshot/auc_ci_hi"] <= 1
  assert 0 <= m["zeroshot/acc"] <= 1 and m["zeroshot/n_test"] > 10
  assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "zeroshot_roc.png"]
  with Image.open(out / "zeroshot_roc.png") as im:
    im.load()


def test_cli_zeroshot_matches_in_process_evaluator(run_dir, zeroshot_out):
  """The evaluator as training calls it (Encoders + state) gives the CLI's numbers."""
  _, encoders, state, _ = runs.load_run(run_dir, None)
  got = dict(evaluate.get("zeroshot")(encoders, n_boot=100).run(state))
  want = json.loads((zeroshot_out / "metrics.json").read_text())["metrics"]
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-6), k


@pytest.mark.slow
def test_cli_finetune(run_dir, tmp_path):
  out = tmp_path / "ft"
  proc = run_eval(
    f"--workdir={run_dir}",
    "--task=finetune",
    f"--out={out}",
    "--cfg=n_boot=50",
    "--cfg=epochs=1",
    "--cfg=seeds=(0, 1)",
    "--cfg=fractions=(0.1, 1.0)",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = json.loads((out / "metrics.json").read_text())["metrics"]
  for tag in ("10pct", "100pct"):
    assert 0 <= m[f"finetune/auc_{tag}"] <= 1 and m[f"finetune/auc_{tag}_std"] >= 0
    assert m[f"finetune/auc_{tag}_ci_lo"] <= m[f"finetune/auc_{tag}_ci_hi"]
    assert 0 <= m[f"finetune/acc_{tag}"] <= 1
  assert m["finetune/n_train"] > 50 and m["finetune/n_test"] > 10
  with Image.open(out / "finetune_roc.png") as im:
    im.load()


def test_finetune_changes_tower_and_lowers_training_loss(run_dir):
  _, encoders, state, _ = runs.load_run(run_dir, None)
  split = features.load_sample_split(encoders.config, "train", True)
  keep = split["finding"] != "todo"
  x = split["image"][keep][:48]
  y = np.char.startswith(split["finding"][keep][:48].astype(str), "COVID-19").astype(int)
  tuner = finetune.FineTuner(encoders.model, lr=3e-3, batch_size=16)
  variables = features.variables_of(state)
  dim = encoders.images(variables, x[:1])[0].shape[1]
  start = tuner.init(variables, dim, seed=0)
  before = tuner.loss(start, x, y)
  tuned, losses = tuner.fit(start, x, y, epochs=6, seed=0)
  after = tuner.loss(tuned, x, y)
  print(f"training-set loss {before:.4f} -> {after:.4f}")
  assert after < before - 0.05, (before, after, losses)
  changed = jax.tree.leaves(
    jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
      tuned["params"]["model"]["image"],
      variables["params"]["image"],
    )
  )
  assert max(changed) > 1e-4 and sum(c > 0 for c in changed) > len(changed) // 2
  # The run's own variables are untouched (the evaluator never writes the checkpoint state).
  assert jax.tree.all(
    jax.tree.map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
      start["params"]["model"]["image"],
      variables["params"]["image"],
    )
  )
