"""The one dataset registry (`medvl_jax.data.corpora`): names, builders, kinds, labels, errors."""

import subprocess
import sys

import pytest

from data_pipelines import (
  chexpert,  # noqa: F401  (before tfds's own `chexpert`: see below)
  common,
  prepare,
)
from data_pipelines.covidx import covidx_dataset_builder
from data_pipelines.nih14 import nih14_dataset_builder
from medvl_jax.data import corpora
from medvl_jax.errors import ConfigError
from medvl_jax.evaluate import datasets
from tests.conftest import REPO

# tfds ships a builder named `chexpert` too; ours must register first, which importing it here
# (at collection) ensures even when a tfds harness test lists tfds's builders before this runs.

# What each corpus/config can serve, from what its builder declares (image and/or sentences).
EXPECTED_KINDS = {
  ("cxr_sample", "paired"): {"paired", "image", "text"},
  ("cxr_sample", "text_only"): {"text"},
  ("cxr_sample", "image_only"): {"image"},
  ("cxr_sample", "nih_halves"): {"image"},
  ("mimic_cxr", "paired"): {"paired", "image", "text"},
  ("mimic_cxr", "paired_64"): {"paired", "image", "text"},
  ("openi", "paired"): {"paired", "image", "text"},
  ("openi", "reports"): {"text"},
  ("nih14", "default"): {"image"},
  ("chexpert", "u_ignore"): {"image"},
  ("chexpert", "u_ones_128"): {"image"},
  ("rsna_pneumonia", "default"): {"image"},
  ("covidx", "default"): {"image"},
}
# The label columns and task types the evaluators read for each corpus.
EXPECTED_LABELS = {
  "cxr_sample": None,
  "mimic_cxr": common.CHEXPERT_LABELS,
  "openi": common.CHEXPERT_LABELS,
  "chexpert": common.CHEXPERT_LABELS,
  "nih14": nih14_dataset_builder.NIH_LABELS,
  "covidx": covidx_dataset_builder.CLASSES,
  "rsna_pneumonia": ("Pneumonia",),
}
EXPECTED_TASK = {
  "covidx": "multiclass",
  "mimic_cxr": "multilabel",
  "openi": "multilabel",
  "chexpert": "multilabel",
  "nih14": "multilabel",
  "rsna_pneumonia": "multilabel",
  "cxr_sample": None,
}


def test_registered_names():
  assert set(corpora.names()) == {
    "cxr_sample",
    "mimic_cxr",
    "openi",
    "nih14",
    "chexpert",
    "rsna_pneumonia",
    "covidx",
  }


@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_every_name_resolves_to_its_builder(name, tmp_path):
  corpus = corpora.get(name)
  assert corpus.name == name
  cls = corpora.builder_cls(name)
  assert cls.name == corpus.tfds_name
  assert corpus.default_config in corpora.config_names(name)
  b = corpora.builder(name, data_dir=str(tmp_path))
  assert b.builder_config.name == corpus.default_config
  assert not b.is_prepared()  # An instance only: nothing was built or read.
  assert corpus.auto_prepare == (name == "cxr_sample")


@pytest.mark.parametrize("name,config", sorted(EXPECTED_KINDS))
def test_kinds_from_builder_features(name, config):
  if config not in corpora.config_names(name):
    pytest.skip(f"{name} has no config {config!r} on this branch")
  assert corpora.kinds(name, config) == frozenset(EXPECTED_KINDS[name, config])


def test_kinds_default_config_and_no_data_read(tmp_path):
  assert corpora.kinds("cxr_sample") == corpora.kinds("cxr_sample", "paired")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_label_names_and_task_types_as_before(name):
  assert corpora.label_names(name) == EXPECTED_LABELS[name]
  assert corpora.task_type(name) == EXPECTED_TASK[name]
  assert datasets.label_names(name) == EXPECTED_LABELS[name]
  assert datasets.default_task_type(name) == (EXPECTED_TASK[name] or "multilabel")
  names = corpora.label_names(name)
  if names is not None:  # One name per column of the builder's `labels` feature.
    labels = corpora.features(name, corpora.get(name).default_config)["labels"]
    assert labels.shape == (len(names),)


def test_unknown_name_is_one_line_listing_valid_names():
  with pytest.raises(ConfigError) as e:
    corpora.get("mimic")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("dataset='mimic' is not a known dataset; valid: ")
  assert msg.endswith(", ".join(sorted(corpora.CORPORA)))
  with pytest.raises(ConfigError, match=r"^config.data.name='x' is not a known dataset"):
    corpora.get("x", key="config.data.name")
  for fn in (corpora.builder_cls, corpora.kinds, corpora.label_names, corpora.task_type):
    with pytest.raises(ConfigError, match="is not a known dataset"):
      fn("nope")


def test_unknown_config_is_one_line_listing_valid_configs(tmp_path):
  with pytest.raises(ConfigError) as e:
    corpora.builder("cxr_sample", "pared", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("builder_config='pared' is not a config of cxr_sample; valid: ")
  assert "paired" in msg and "text_only" in msg
  with pytest.raises(ConfigError, match="'u_maybe' is not a config of chexpert; valid: u_ignore"):
    corpora.kinds("chexpert", "u_maybe")
  assert not list(tmp_path.iterdir())


def test_prepare_reads_the_registry(tmp_path):
  b = prepare.builder_for("cxr_sample", config=None, image_size=256, data_dir=str(tmp_path))
  assert (b.name, b.builder_config.name) == ("cxr_sample", "paired")
  b = prepare.builder_for("chexpert", config=None, image_size=64, data_dir=str(tmp_path))
  assert b.builder_config.name == "u_ignore_64"
  b = prepare.builder_for("openi", config="reports", image_size=256, data_dir=str(tmp_path))
  assert b.builder_config.name == "reports"  # Text only: no image size in the name.
  assert corpora.prepare_command(b) == (
    "python -m data_pipelines.prepare openi --config=reports --manual_dir=DIR "
    f"--data_dir={tmp_path}"
  )
  with pytest.raises(ConfigError, match="^corpus='nope' is not a known dataset; valid: "):
    prepare.builder_for("nope", config=None, image_size=256, data_dir=str(tmp_path))


def test_importing_the_registry_imports_no_data_pipeline():
  code = (
    "import sys; from medvl_jax.data import corpora; corpora.get('chexpert'); "
    "bad = [m for m in sys.modules if m.split('.')[0] in "
    "('data_pipelines', 'tensorflow', 'tensorflow_datasets')]; "
    "assert not bad, bad"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
