"""The study's design: its arms, seeds, sizes, the pre-specified comparisons and settings, and
each arm's run config and stages (see experiments/study.py for what the arms are)."""

import importlib.util
import pathlib
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
BOOT_SEED = 0
FOLD_SEED = 0  # the NIH probe's patient folds: the same for every arm and seed
FRACTIONS = (0.1, 1.0)
RECALL_KS = (1, 5, 10)
# Held-out patients of covid_cxr_notes. The validation patients choose each trained run's
# checkpoint (its lowest validation loss), so the claims' held-out figures (retrieval, held-out
# losses, regeneration) read the test patients alone. The COVID-19 probe, whose labels play no
# part in that choice, keeps both splits (all held-out patients hold only 4 negatives).
SELECT_SPLIT = "validation"
HELD_OUT = ("test",)
COVID_HELD_OUT = ("validation", "test")
MASK_SEED = 0  # the held-out MLM masks: the same tokens masked for every arm and seed

# Training sources (config.data.sources entries). The NIH images of the pretraining half only
# (`cxr_sample`/`nih_halves` split `pretrain`); the probe reads the other half (`probe`), so
# no arm is evaluated on an image it was pretrained on. The Open-i reports (Indiana) come
# from an institution that none of the evaluation data comes from.
PAIRED = dict(name="cxr_sample", builder_config="paired", split="train", kind="paired")
NIH_PRETRAIN = dict(name="cxr_sample", builder_config="nih_halves", split="pretrain", kind="image")
NIH_PROBE = ("cxr_sample", "nih_halves", "probe")  # corpus, builder config, split
OPENI_TEXT = dict(name="openi", builder_config="reports", split="train", kind="text")

ARMS: dict[str, dict[str, Any]] = {
  "a_resnet": dict(
    title="(a) no pretraining, ResNet",
    short="(a-ResNet)",
    config="convirt",
    train=False,
    sources=None,
    data="none",
  ),
  "a_vit": dict(
    title="(a) no pretraining, ViT",
    short="(a-ViT)",
    config="mixed",
    train=False,
    sources=None,
    data="none",
  ),
  "b": dict(
    title="(b) ConVIRT, paired",
    short="(b)",
    config="convirt",
    train=True,
    sources=((PAIRED, 1.0),),
    data="covid_cxr_notes train pairs",
  ),
  "c": dict(
    title="(c) mixed, paired only",
    short="(c)",
    config="mixed",
    train=True,
    sources=((PAIRED, 1.0),),
    data="covid_cxr_notes train pairs",
  ),
  "d": dict(
    title="(d) mixed, paired + unpaired",
    short="(d)",
    config="mixed",
    train=True,
    sources=((PAIRED, 0.5), (NIH_PRETRAIN, 0.25), (OPENI_TEXT, 0.25)),
    data="covid_cxr_notes pairs + NIH pretraining-half images + Open-i reports",
  ),
  "e": dict(
    title="(e) mixed, unpaired only",
    short="(e)",
    config="mixed",
    train=True,
    sources=((NIH_PRETRAIN, 0.5), (OPENI_TEXT, 0.5)),
    data="NIH pretraining-half images + Open-i reports",
  ),
}
# Each trained arm against the untrained arm of its architecture (its own initialisation:
# the same config and seed), and (d) against (c).
COMPARISONS = (("b", "a_resnet"), ("c", "a_vit"), ("d", "a_vit"), ("e", "a_vit"), ("d", "c"))
# Modes: 'small' (the study: the configs' `small` size, thousands of steps), 'full' (the
# configs' full size at their own short length, for GPU/TPU users), 'quick' (the `smoke` size,
# a few steps: the slow tests' end-to-end check).
MODES = ("small", "full", "quick")
SETTINGS = {
  "small": dict(variant="small", steps=None, seeds=(0, 1, 2), n_boot=1000, folds=5),
  "full": dict(variant=None, steps=None, seeds=(0, 1, 2), n_boot=1000, folds=5),
  "quick": dict(variant="smoke", steps=4, seeds=(0, 1), n_boot=100, folds=3),
}


class StudyError(Exception):
  """A problem reported as one line `error: ...`."""


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"_study_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_name(arm: str, seed: int) -> str:
  """The unit of work and of the files under OUT: one arm at one training seed."""
  return f"{arm}/seed{seed}"


def arm_config(arm: str, mode: str, data_dir: pathlib.Path, seed: int):
  """The arm's run config at `seed`: the mode's size of its config file with the arm's
  training sources, the study's data dir (quick: the `smoke` size, short, with the MiniLM text
  tower every arm starts from)."""
  info, s = ARMS[arm], SETTINGS[mode]
  c = _config_module(info["config"]).get_config(s["variant"])
  if info["sources"]:
    c.data.sources = tuple(dict(src, weight=w) for src, w in info["sources"])
  if info["config"] == "mixed" and not any(
    src["kind"] == "paired" for src, _ in info["sources"] or ()
  ):
    c.loss.contrastive_weight = 0.0  # no pairs: the term is always zero anyway
  if mode == "quick":
    # Smoke variants use a random tiny BERT; every arm of the study starts from MiniLM.
    c.model.text.init, c.model.text.tokenizer = c.model.text.tokenizer, ""
    c.model.text.init_layers = 1
    c.total_steps = s["steps"]
    c.eval_every = c.checkpoint_every = c.total_steps
    c.log_every = 1
  if info["train"]:
    c.evaluators = curve_evaluators(arm)
  c.seed = seed
  c.data.data_dir = str(data_dir)
  return c


def stages_of(arm: str) -> list[str]:
  evals = ["nih", "covid", "retrieval", "heldout"]
  if ARMS[arm]["config"] == "mixed":
    evals.append("regeneration")
  return (["train"] if ARMS[arm]["train"] else []) + evals


def needs_openi(arm: str) -> bool:
  """Whether the arm trains on the Open-i reports (prepared once, before any arm runs)."""
  return any(src is OPENI_TEXT for src, _ in ARMS[arm]["sources"] or ())


def curve_evaluators(arm: str) -> list[dict[str, Any]]:
  """The downstream figures each evaluation of a trained run logs (its learning curves):
  text->image retrieval on the held-out validation pairs, and for the mixed model the
  masked-patch regeneration of the same images."""
  evs = [dict(name="retrieval", pairs_split="validation", n_boot=100)]
  if ARMS[arm]["config"] == "mixed":
    evs.append(dict(name="regeneration", splits=("validation",), n_boot=100))
  return evs
