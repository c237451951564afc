"""The study's design: its arms, the pre-specified comparisons, the seeds and settings, and
each arm's run config and stages (see experiments/study.py for what the arms are)."""

import importlib.util
import pathlib
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = 0
BOOT_SEED = 0
FRACTIONS = (0.1, 1.0)
RECALL_KS = (1, 5, 10)
HELD_OUT = ("validation", "test")

ARMS: dict[str, dict[str, Any]] = {
  "a_resnet": dict(
    title="(a) no pretraining, ResNet",
    short="(a-ResNet)",
    config="convirt",
    variant=None,
    train=False,
    data="none",
  ),
  "a_vit": dict(
    title="(a) no pretraining, ViT",
    short="(a-ViT)",
    config="mixed",
    variant=None,
    train=False,
    data="none",
  ),
  "b": dict(
    title="(b) ConVIRT, paired",
    short="(b)",
    config="convirt",
    variant=None,
    train=True,
    data="covid_cxr_notes train pairs",
  ),
  "c": dict(
    title="(c) mixed, paired only",
    short="(c)",
    config="mixed",
    variant="paired_only",
    train=True,
    data="covid_cxr_notes train pairs",
  ),
  "d": dict(
    title="(d) mixed, paired + unpaired",
    short="(d)",
    config="mixed",
    variant=None,
    train=True,
    data="covid_cxr_notes pairs + nih14_sample images + iu_reports texts",
  ),
  "e": dict(
    title="(e) mixed, unpaired only",
    short="(e)",
    config="mixed",
    variant="unpaired",
    train=True,
    data="nih14_sample images + iu_reports texts",
  ),
}
COMPARISONS = (("b", "a_resnet"), ("c", "a_vit"), ("d", "a_vit"), ("e", "a_vit"), ("d", "c"))
SETTINGS = {
  "full": dict(steps=None, n_boot=1000, folds=5),  # steps None: the config's total_steps
  "quick": dict(steps=4, n_boot=100, folds=3),
}


class StudyError(Exception):
  """A problem reported as one line `error: ...`."""


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"_study_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def arm_config(arm: str, mode: str, data_dir: pathlib.Path):
  """The arm's run config: the config file's variant (quick: its `smoke` variant with the
  variant's data sources and the MiniLM text tower), the study's seed and data dir."""
  info = ARMS[arm]
  module = _config_module(info["config"])
  if mode == "quick":
    c = module.get_config("smoke")
    if info["variant"]:
      v = module.get_config(info["variant"])
      c.data.sources = v.data.sources
      c.loss.contrastive_weight = v.loss.contrastive_weight
    # Smoke variants use a random tiny BERT; every arm of the study starts from MiniLM.
    c.model.text.init, c.model.text.tokenizer = c.model.text.tokenizer, ""
    c.total_steps = SETTINGS["quick"]["steps"]
    c.eval_every = c.checkpoint_every = c.total_steps
    c.log_every = 1
  else:
    c = module.get_config(info["variant"])
  c.seed = SEED
  c.data.data_dir = str(data_dir)
  return c


def stages_of(arm: str) -> list[str]:
  evals = ["nih", "covid", "retrieval"]
  if ARMS[arm]["config"] == "mixed":
    evals.append("regeneration")
  return (["train"] if ARMS[arm]["train"] else []) + evals
