"""The exported folder's model card (README.md): what the export tests check in both families'
exports, and the git commit it records, against real git repositories."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess

import yaml

from medvl_jax.interop import model_card
from tests import privacy
from tests.conftest import read_scalars

FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n(.*)\Z", re.S)
COMMIT = re.compile(r"[0-9a-f]{40}( \(with uncommitted changes\))?|unknown")


def read_card(out: pathlib.Path) -> tuple[dict, str]:
  """(the card's YAML front matter, parsed; the text after it)."""
  match = FRONT_MATTER.match((out / "README.md").read_text())
  assert match, "README.md does not start with a --- YAML front matter block ---"
  return yaml.safe_load(match.group(1)), match.group(2)


def card_snippet(out: pathlib.Path) -> str:
  """The card's PyTorch snippet, with `out` set to the exported folder."""
  _, body = read_card(out)
  section = body[body.index("## Use in PyTorch") :]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  code, n = re.subn(r'^out = ".*?"', f"out = {str(out)!r}", code, flags=re.M)
  assert n == 1, "the card's snippet sets `out` on one line"
  return code


def check_card(
  out: pathlib.Path, workdir: pathlib.Path, sample_dir: pathlib.Path
) -> tuple[dict, str]:
  """What every export's card holds; returns (its front matter, its body)."""
  front, body = read_card(out)
  meta = json.loads((out / "export.json").read_text())
  config = meta["config"]
  data = config["data"]
  shorthand = {"name": data["name"], "builder_config": data["builder_config"]}
  sources = data["sources"] or [dict(shorthand, split=data["train_split"], kind="paired")]
  assert front["library_name"] == "medvl_jax" and front["license"] in ("other", "unknown")
  assert {"medvl_jax", "medical-imaging", "chest-x-ray"} <= set(front["tags"])
  assert front["datasets"] == list(
    dict.fromkeys(f"{s['name']}/{s['builder_config']}" for s in sources)
  )
  # The step, the data and splits, the config and the code.
  assert f"checkpoint **step {meta['step']}**" in body
  for s in sources:
    row = f"| `{s['name']}` | `{s['builder_config']}` | `{s['split']}` | {s['kind']} ("
    assert row in body, row
  assert (
    f"Validation: split `{data['eval_split']}` of `{data['name']}/{data['builder_config']}`" in body
  )
  assert "The whole training config is `config` in `export.json`" in body
  assert meta["config"] == json.loads((workdir / "config.json").read_text())
  assert f"| global batch size | {config['batch_size']} |" in body
  assert COMMIT.fullmatch(meta["code_commit"]) and meta["code_commit"] in body
  # The validation metrics training logged at that step (TensorBoard, read here by TensorFlow).
  val_loss = read_scalars(workdir / "tensorboard")["val_loss"][meta["step"]]
  assert f"| val_loss | {val_loss:.4g} |" in body
  assert "**Not for diagnosis" in body
  # Names and numbers only: no report text, no patient id of the sample.
  sentences, ids = privacy.sample_secrets(sample_dir)
  assert privacy.find_leaks((out / "README.md").read_text(), sentences, ids) == []
  return front, body


# ----------------------------------------------------------------------------- code commit
def _card_module_at(root: pathlib.Path):
  """model_card.py placed at ROOT/medvl_jax/interop/ and imported from there."""
  path = root / "medvl_jax" / "interop" / "model_card.py"
  path.parent.mkdir(parents=True)
  shutil.copyfile(model_card.__file__, path)
  spec = importlib.util.spec_from_file_location(f"card_at_{root.name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _git(cwd: pathlib.Path, *args: str) -> str:
  identity = {"NAME": "t", "EMAIL": "t@example.com"}
  env = dict(
    os.environ,
    **{f"GIT_{who}_{k}": v for who in ("AUTHOR", "COMMITTER") for k, v in identity.items()},
  )
  proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip()


def test_code_commit_is_known_at_the_top_of_a_git_checkout_only(tmp_path):
  checkout = tmp_path / "checkout"
  card = _card_module_at(checkout)
  _git(checkout, "init", "-q")
  _git(checkout, "add", ".")
  _git(checkout, "commit", "-q", "-m", "code")
  head = _git(checkout, "rev-parse", "HEAD")
  assert card.code_commit() == head
  (checkout / "medvl_jax" / "interop" / "model_card.py").write_text("# changed\n")
  assert card.code_commit() == f"{head} (with uncommitted changes)"
  # Installed inside another repository (a .venv in a checkout): not that repository's commit.
  installed = _card_module_at(checkout / ".venv" / "site-packages")
  assert installed.code_commit() == "unknown"
  # No git checkout at all.
  assert _card_module_at(tmp_path / "plain").code_commit() == "unknown"


def test_evaluations_are_those_of_the_exported_step(tmp_path):
  """`python -m medvl_jax.evaluate` outputs (their metrics.json layout) of the exported step
  count; another step's, or an unreadable file, do not."""

  def write(name: str, step, metrics) -> None:
    (tmp_path / "eval" / name).mkdir(parents=True)
    result = {"task": name.split("-")[0], "step": step, "workdir": str(tmp_path), "cfg": {}}
    (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(dict(result, **metrics)))

  write("zeroshot-step3", 3, {"metrics": {"auc": 0.75, "auc_ci_lo": 0.6, "auc_ci_hi": 0.9}})
  write("zeroshot-step2", 2, {"metrics": {"auc": 0.5}})
  (tmp_path / "eval" / "broken").mkdir()
  (tmp_path / "eval" / "broken" / "metrics.json").write_text("{")
  assert model_card.evaluations(tmp_path, 3) == [
    ("eval/zeroshot-step3/metrics.json", {"auc": 0.75, "auc_ci_lo": 0.6, "auc_ci_hi": 0.9})
  ]
  assert model_card.evaluations(tmp_path / "nothing", 3) == []
