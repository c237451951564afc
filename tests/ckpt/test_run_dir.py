"""Reading a run's config.json (medvl_jax.ckpt.run_dir.load_run_config): a config.json without
the keys that another version of the code did not write still builds, restores and resumes,
with the values that version ran with; a ViT image tower gets no ResNet setting. Writing it,
and setting a run aside, in a local workdir and in a bucket (a GCS emulator)."""

import json
import shutil

import jax
import pytest

from configs import convirt, mixed
from medvl_jax import config_check, families, paths
from medvl_jax.ckpt import run_dir
from medvl_jax.errors import ConfigError

pytest_plugins = ("tests.conftest_gcs",)

FILLED = {
  "accumulate_steps": 1,
  "evaluators": [],
  "mesh": [["data", -1], ["fsdp", 1], ["model", 1]],
  "sharding.fsdp_min_size": 2**14,
  "data.sources": [],
  "data.allow_repeats": False,
  "loss.impl": "gather",
  "model.image.conv_impl": "auto",
}


def _without(tree: dict, keys) -> dict:
  for key in keys:
    *sections, last = key.split(".")
    node = tree
    for part in sections:
      node = node[part]
    node.pop(last, None)
  return tree


def _value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def test_config_json_without_the_filled_keys_loads_with_them(tmp_path):
  written = json.loads(run_dir.config_json(convirt.get_config("smoke")))
  (tmp_path / "config.json").write_text(json.dumps(_without(written, FILLED)))
  config = run_dir.load_run_config(tmp_path)
  for key, value in FILLED.items():
    assert _value(config, key) == value, key
  families.get(config.model.name).build(config.model)  # reads model.image.conv_impl


def test_current_config_json_loads_unchanged(tmp_path):
  """A config.json of this code has every key: loading adds nothing."""
  for module in (convirt, mixed):
    cfg = module.get_config("smoke")
    run_dir.write_run_config(tmp_path, cfg)
    assert run_dir.load_run_config(tmp_path).to_dict() == json.loads(run_dir.config_json(cfg))


def test_vit_tower_gets_no_resnet_setting(tmp_path):
  written = json.loads(run_dir.config_json(mixed.get_config("smoke")))
  assert "conv_impl" not in written["model"]["image"]
  (tmp_path / "config.json").write_text(json.dumps(_without(written, FILLED)))
  config = run_dir.load_run_config(tmp_path)
  assert "conv_impl" not in config.model.image
  assert config.loss.impl == "gather" and list(config.data.sources) == []
  families.get(config.model.name).build(config.model)


@pytest.fixture
def run_without_filled_keys(short_run, tmp_path):
  """A copy of the 3-step smoke run whose config.json lacks the filled keys."""
  workdir = tmp_path / "run"
  shutil.copytree(short_run, workdir, ignore=shutil.ignore_patterns("eval", "discarded-*"))
  written = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps(_without(written, FILLED)))
  return workdir


def test_run_without_filled_keys_restores_and_resumes(run_without_filled_keys, tfds_dir):
  workdir = run_without_filled_keys
  config = run_dir.load_run_config(workdir)
  model = families.get(config.model.name).build(config.model)
  step, params, _ = run_dir.restore_variables(workdir, config, model)
  assert step == 3 and jax.tree.leaves(params)
  # The smoke config with its defaults resumes it; a filled key is compared like any other.
  cfg = convirt.get_config("smoke")
  cfg.data.data_dir = str(tfds_dir)
  config_check.check_resumable(workdir, cfg)
  cfg.model.image.conv_impl = "xla"
  with pytest.raises(ConfigError, match=r"model.image.conv_impl \('auto' -> 'xla'\)"):
    config_check.check_resumable(workdir, cfg)


def test_config_json_and_restart_from_scratch(local_or_bucket):
  """config.json round-trips; the run's checkpoints, logs and damaged steps are set aside in
  one `discarded-<time>/` and nothing else moves."""
  workdir = paths.join(local_or_bucket, "run")
  cfg = convirt.get_config("smoke")
  run_dir.write_run_config(workdir, cfg)
  assert run_dir.load_run_config(workdir).to_dict() == json.loads(run_dir.config_json(cfg))
  assert run_dir.restart_from_scratch(workdir) is None  # nothing to set aside
  kept = ["checkpoints/10/commit_success.txt", "tensorboard/events.out.tfevents.1"]
  kept += ["checkpoints_damaged/20-20260101T000000Z/state/_METADATA"]
  for rel in kept:
    paths.write_text(paths.join(workdir, *rel.split("/")), rel)
  aside = run_dir.restart_from_scratch(workdir)
  assert paths.name(aside).startswith("discarded-") and paths.parent(aside) == workdir
  assert paths.files(workdir) == ["config.json"] + sorted(f"{paths.name(aside)}/{r}" for r in kept)
  assert paths.read_text(paths.join(aside, "tensorboard", "events.out.tfevents.1")) == kept[1]
