r"""Issue 15's study in one command: does pretraining help here, and does unpaired data add?

  JAX_PLATFORMS=cpu python -m experiments.study --out=/path/study          # default length
  JAX_PLATFORMS=cpu python -m experiments.study --out=/path/study --quick  # CI-sized check
  python -m experiments.study --out=/path/study --publish   # RESULTS.md + plots into docs/

Arms (the same seed and the same evaluations for all; text towers start from the bundled
MiniLM checkpoint, image towers from random initialisation):
  a_resnet, a_vit  (a) no pretraining: the ResNet-50 and the ViT-B/16 at their random init
  b                ConVIRT on the paired `covid_cxr_notes` training patients (configs/convirt.py)
  c                the mixed model on paired only            (configs/mixed.py:paired_only)
  d                the mixed model on paired + NIH images + IU reports  (configs/mixed.py)
  e                the mixed model on NIH images + IU reports only      (configs/mixed.py:unpaired)
Each pretrained arm is compared with the (a) arm of its own image architecture, and (d) with
(c). Default length: the configs' own (ConVIRT 48 steps at batch 32, mixed 32 steps at batch
16; about 15 min per arm on 2 free CPU cores, about 1.5 h for the whole study with its
evaluations); `--quick`: the configs' tiny `smoke` variants (MiniLM text tower kept) for 4
steps, fewer folds and resamples (a few minutes).

Resumable: OUT/arms/<arm>/state.json (written atomically) records each finished stage
(training, and each evaluation: nih, covid, retrieval, regeneration); a finished stage is never
redone, an interrupted training resumes from its last checkpoint. The report (bootstrap CIs,
paired differences, OUT/study_metrics.json, OUT/RESULTS.md, OUT/plots/) is recomputed from the
saved per-row scores at the end of every invocation. TensorBoard: OUT/runs/<arm>/tensorboard.
Errors: one line `error: ...` on stderr, exit status 2.
"""

import argparse
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
import types
from typing import Any

import numpy as np

from experiments import results

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


def log(msg: str) -> None:
  print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- files
def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic: a temporary file beside `path`, renamed over it."""
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
  try:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def save_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}.npz")
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


class ArmState:
  """OUT/arms/<arm>/state.json: {'stages': {stage: {'wall_s', ...}}}; atomic writes."""

  def __init__(self, out: pathlib.Path, arm: str):
    self.dir = out / "arms" / arm
    self.dir.mkdir(parents=True, exist_ok=True)
    self.path = self.dir / "state.json"
    self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

  def done(self, stage: str) -> bool:
    return stage in self.data["stages"]

  def mark(self, stage: str, **info: Any) -> None:
    self.data["stages"][stage] = info
    write_json(self.path, self.data)


# ----------------------------------------------------------------------------- configs
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


# ----------------------------------------------------------------------------- models
def untrained(config) -> tuple[Any, Any]:
  """(model, state) at the training's own initialisation (seed, pretrained text tower)."""
  import jax  # pylint: disable=g-import-not-at-top

  from medvl_jax import families  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  family = families.get(config.model.name)
  model = family.build(config.model)
  init_rng, _ = step_lib.rngs(config)
  variables = jax.jit(functools.partial(step_lib.init_variables, model, config))(init_rng)
  variables = jax.device_get(variables)
  if family.has_pretrained(config.model):
    variables = family.init_from_pretrained(variables, config.model)
  state = types.SimpleNamespace(
    params=variables["params"], batch_stats=variables.get("batch_stats", {})
  )
  return model, state


def encoders_and_state(arm: str, config, workdir: pathlib.Path):
  from medvl_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import features, runs  # pylint: disable=g-import-not-at-top

  if ARMS[arm]["train"]:
    config, encoders, state, _ = runs.load_run(workdir, None)
    return config, encoders, state
  model, state = untrained(config)
  tokenizer = input_pipeline.load_tokenizer(config.model.text.tokenizer or config.model.text.init)
  return config, features.Encoders(model, config, tokenizer), state


# ----------------------------------------------------------------------------- evaluations
def load_nih(config) -> dict[str, np.ndarray]:
  """All of `nih14_sample` (every split of cxr_sample/image_only), eval transform."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from medvl_jax.data import corpora, input_pipeline  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import datasets  # pylint: disable=g-import-not-at-top

  b = corpora.builder("cxr_sample", "image_only", config.data.data_dir)
  if not b.is_prepared():
    b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=str(input_pipeline.resolve_sample_dir(config)), try_download_gcs=False
      )
    )
  kw = dict(
    builder_config="image_only",
    data_dir=config.data.data_dir,
    image_size=int(config.data.image_size),
    resize=int(config.data.resize),
  )
  parts = [datasets.load_split("cxr_sample", s, **kw) for s in ("train",) + HELD_OUT]
  data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(data["image_id"], kind="stable")  # The same row order for every arm.
  data = {k: v[order] for k, v in data.items()}
  # The order of the builder's `labels` feature (not the nih14 corpus's registry order).
  names = importlib.import_module("data_pipelines.cxr_sample.cxr_sample_dataset_builder").NIH_LABELS
  keep = [i for i, n in enumerate(names) if n != "No Finding"]
  data["labels"] = data["labels"][:, keep]
  data["names"] = np.asarray([names[i] for i in keep])
  return data


def patient_folds(patients: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Fold id per row; every patient's rows in one fold (patients shuffled, dealt round-robin)."""
  unique = np.unique(patients)
  rng = np.random.default_rng(seed)
  fold_of = {p: i % k for i, p in enumerate(rng.permutation(unique))}
  return np.array([fold_of[p] for p in patients])


def eval_nih(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  from medvl_jax.evaluate import features, linear_probe, metrics  # pylint: disable=g-import-not-at-top

  data = load_nih(config)
  h, _ = encoders.images(features.variables_of(state), data["image"])
  y = data["labels"]
  folds = patient_folds(data["patient_id"], s["folds"], SEED)
  out = {k: data[k] for k in ("image_id", "patient_id", "labels", "names")}
  for frac in FRACTIONS:
    oof = np.full(y.shape, np.nan)
    for k in range(s["folds"]):
      tr, te = folds != k, folds == k
      mean, std = h[tr].mean(0), h[tr].std(0) + 1e-6
      x_tr, x_te = (h[tr] - mean) / std, (h[te] - mean) / std
      idx = metrics.stratified_fraction(y[tr], frac, seed=k)
      scores = linear_probe.one_vs_rest_scores(x_tr[idx], y[tr][idx], x_te)
      for c, sc in enumerate(scores):
        if sc is not None:
          oof[te, c] = sc
    out[f"scores_{round(frac * 100)}pct"] = oof
  return out


def eval_covid(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  del s
  from medvl_jax.evaluate import features, linear_probe, metrics  # pylint: disable=g-import-not-at-top

  data = features.load_sample_task(config, "COVID-19", ("todo",), True, "train", HELD_OUT, "study")
  variables = features.variables_of(state)
  h_tr, _ = encoders.images(variables, data["train"]["image"])
  h_te, _ = encoders.images(variables, data["test"]["image"])
  mean, std = h_tr.mean(0), h_tr.std(0) + 1e-6
  x_tr, x_te = (h_tr - mean) / std, (h_te - mean) / std
  y_tr = data["train"]["label"]
  out = {
    "image_id": data["test"]["image_id"].astype(str),
    "patient_id": data["test"]["patient_id"].astype(str),
    "labels": data["test"]["label"],
    "n_train": np.asarray(len(y_tr)),
  }
  for frac in FRACTIONS:
    idx = metrics.stratified_fraction(y_tr, frac, seed=SEED)
    w, b = linear_probe.fit_logistic(x_tr[idx], y_tr[idx])
    out[f"scores_{round(frac * 100)}pct"] = x_te @ w + b
  return out


def eval_retrieval(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  del s
  from medvl_jax.evaluate import features, metrics  # pylint: disable=g-import-not-at-top

  parts = [features.load_sample_split(config, split) for split in HELD_OUT]
  data = {
    k: np.concatenate([p[k] for p in parts]) for k in ("image", "text", "patient_id", "image_id")
  }
  variables = features.variables_of(state)
  _, z_v = encoders.images(variables, data["image"])
  z_u = encoders.texts(variables, [str(t) for t in data["text"]])
  scores = features.l2_normalize(z_u) @ features.l2_normalize(z_v).T  # [note, image]
  patients = data["patient_id"].astype(str)
  relevant = patients[:, None] == patients[None, :]
  out = {"image_id": data["image_id"].astype(str), "patient_id": patients}
  for k in RECALL_KS:
    out[f"hits_{k}"] = metrics.hit_at_k(scores, relevant, k)
  return out


def eval_regeneration(encoders, state, config, s: dict) -> dict[str, float]:
  del config
  from medvl_jax.evaluate import regeneration  # pylint: disable=g-import-not-at-top

  ev = regeneration.Evaluator(encoders, dataset="paired", splits=HELD_OUT, n_boot=s["n_boot"])
  return {k: v for k, v in ev.run(state)}


EVALS = {
  "nih": eval_nih,
  "covid": eval_covid,
  "retrieval": eval_retrieval,
  "regeneration": eval_regeneration,
}


def stages_of(arm: str) -> list[str]:
  evals = ["nih", "covid", "retrieval"]
  if ARMS[arm]["config"] == "mixed":
    evals.append("regeneration")
  return (["train"] if ARMS[arm]["train"] else []) + evals


# ----------------------------------------------------------------------------- running
class Eta:
  """Remaining time from the measured wall time of finished stages of the same kind."""

  def __init__(self):
    self.walls: dict[str, list[float]] = {}

  def add(self, kind: str, wall: float) -> None:
    self.walls.setdefault(kind, []).append(wall)

  def remaining(self, kinds: list[str]) -> str:
    known = [np.mean(self.walls[k]) for k in kinds if k in self.walls]
    unknown = sum(k not in self.walls for k in kinds)
    total = results._duration(float(sum(known))) if known else "0h 00m 00s"
    return total + (f" + {unknown} stage(s) not yet timed" if unknown else "")


def kind_of(arm: str, stage: str) -> str:
  return f"{stage}:{ARMS[arm]['config']}"


def run_arm(arm: str, out: pathlib.Path, mode: str, eta: Eta, todo: list[tuple[str, str]]) -> None:
  st = ArmState(out, arm)
  config = arm_config(arm, mode, out / "tfds")
  workdir = out / "runs" / arm
  encoders = state = None
  for stage in stages_of(arm):
    if st.done(stage):
      continue
    todo.remove((arm, stage))
    log(f"arm {arm} {ARMS[arm]['title']}: {stage} ...")
    t0 = time.perf_counter()
    if stage == "train":
      from medvl_jax.ckpt import checkpoint
      from medvl_jax.train import loop

      handler = signal.getsignal(signal.SIGTERM)  # training installs its own (preemption)
      try:
        loop.train_and_evaluate(config, str(workdir))
      finally:
        signal.signal(signal.SIGTERM, handler)
      reached = checkpoint.latest_intact_step(workdir)
      if reached is None or reached < config.total_steps:  # stopped early (SIGTERM)
        raise StudyError(
          f"arm {arm}: training stopped at step {reached or 0} of {config.total_steps}; "
          "run the same command again to resume"
        )
      info = dict(steps=int(config.total_steps))
    else:
      if encoders is None:
        config, encoders, state = encoders_and_state(arm, config, workdir)
      result = EVALS[stage](encoders, state, config, SETTINGS[mode])
      if stage == "regeneration":
        write_json(st.dir / "regeneration.json", result)
      else:
        save_npz(st.dir / f"{stage}.npz", **result)
      info = {}
    wall = time.perf_counter() - t0
    st.mark(stage, wall_s=wall, finished=_now(), **info)
    eta.add(kind_of(arm, stage), wall)
    log(
      f"arm {arm}: {stage} done in {results._duration(wall)}; "
      f"{len(todo)} stage(s) left, ETA {eta.remaining([kind_of(a, s) for a, s in todo])}"
    )


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- report
def _ci(fn, groups, n_boot: int) -> dict[str, float | None]:
  from medvl_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

  ci = metrics.bootstrap_ci(fn, groups, n_boot=n_boot, seed=BOOT_SEED)
  return {"lo": ci["lo"], "hi": ci["hi"]}


def _metric_fns(arm_dir: pathlib.Path) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
  """{metric: (fn(rows) -> value, patient groups, row ids)} from an arm's saved scores."""
  from medvl_jax.evaluate import linear_probe, metrics  # pylint: disable=g-import-not-at-top

  fns = {}
  nih = np.load(arm_dir / "nih.npz")
  y = nih["labels"]
  for frac in FRACTIONS:
    tag = f"{round(frac * 100)}pct"
    sc = nih[f"scores_{tag}"]
    cols = [None if np.isnan(sc[:, c]).any() else sc[:, c] for c in range(y.shape[1])]

    def macro(r, y=y, cols=cols):
      return linear_probe.macro_masked_auc(y[r], [None if c is None else c[r] for c in cols], True)

    fns[f"nih_auc_{tag}"] = (macro, nih["patient_id"], nih["image_id"])
    for c, name in enumerate(nih["names"]):

      def one(r, c=c, y=y, cols=cols):
        return None if cols[c] is None else linear_probe.masked_auc(y[r, c], cols[c][r], True)

      fns[f"nih_auc_{tag}/{name}"] = (one, nih["patient_id"], nih["image_id"])
  cov = np.load(arm_dir / "covid.npz")
  for frac in FRACTIONS:
    tag = f"{round(frac * 100)}pct"

    def auc(r, y=cov["labels"], s=cov[f"scores_{tag}"]):
      return metrics.roc_auc(y[r], s[r], fast=True)

    fns[f"covid_auc_{tag}"] = (auc, cov["patient_id"], cov["image_id"])
  ret = np.load(arm_dir / "retrieval.npz")
  for k in RECALL_KS:

    def recall(r, h=ret[f"hits_{k}"]):
      return float(h[r].mean())

    fns[f"t2i_R@{k}"] = (recall, ret["patient_id"], ret["image_id"])
  return fns


def _value(fn, n: int) -> float | None:
  v = fn(np.arange(n))
  return None if v is None else float(v)


def build_metrics(out: pathlib.Path, mode: str, command: str, arms: list[str]) -> dict[str, Any]:
  s = SETTINGS[mode]
  done = [a for a in arms if all(ArmState(out, a).done(st) for st in stages_of(a))]
  fns = {a: _metric_fns(out / "arms" / a) for a in done}
  arm_out = {}
  for a in done:
    st = ArmState(out, a).data["stages"]
    cfg = arm_config(a, mode, out / "tfds")
    m = {}
    for name, (fn, groups, _) in fns[a].items():
      m[name] = {"value": _value(fn, len(groups)), **_ci(fn, groups, s["n_boot"])}
    per_label = {
      tag: {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"nih_auc_{tag}/")}
      for tag in ("10pct", "100pct")
    }
    main = {k: v for k, v in m.items() if "/" not in k}
    regen = None
    if (out / "arms" / a / "regeneration.json").is_file():
      r = json.loads((out / "arms" / a / "regeneration.json").read_text())
      scales = sorted(
        {k.split("_")[-1] for k in r if k.startswith("regeneration/psnr_gain_") and "_ci_" not in k}
      )
      regen = {
        sc: {
          key: {
            "value": r.get(f"regeneration/{src}_{sc}"),
            "lo": r.get(f"regeneration/{src}_{sc}_ci_lo"),
            "hi": r.get(f"regeneration/{src}_{sc}_ci_hi"),
          }
          for key, src in (("psnr", "psnr"), ("psnr_gain", "psnr_gain"))
        }
        for sc in scales
      }
    image = cfg.model.image
    model = (
      f"{image.variant} + MiniLM text"
      if cfg.model.name == "convirt"
      else f"ViT (patch {image.patch_size}, width {image.hidden_size}, {image.num_layers} layers)"
      " + MiniLM text, fusion, decoder"
    )
    arm_out[a] = dict(
      title=ARMS[a]["title"],
      short=ARMS[a]["short"],
      model=f"{model}, {int(cfg.data.image_size)} px",
      data=ARMS[a]["data"],
      trained=ARMS[a]["train"],
      steps=int(cfg.total_steps),
      batch_size=int(cfg.batch_size),
      wall_train_s=st.get("train", {}).get("wall_s"),
      wall_eval_s=sum(v["wall_s"] for k, v in st.items() if k != "train"),
      metrics=main,
      nih_per_label=per_label,
      regeneration=regen,
    )
  comparisons = []
  for arm, base in COMPARISONS:
    if arm not in fns or base not in fns:
      continue
    cm = {}
    for name, (fa, groups, ids) in fns[arm].items():
      if "/" in name:
        continue
      fb, groups_b, ids_b = fns[base][name]
      if not np.array_equal(ids, ids_b) or not np.array_equal(groups, groups_b):
        raise StudyError(f"{name}: arms {arm} and {base} were evaluated on different rows")

      def diff(r, fa=fa, fb=fb):
        va, vb = fa(r), fb(r)
        return None if va is None or vb is None else va - vb

      cm[name] = {"value": _value(diff, len(groups)), **_ci(diff, groups, s["n_boot"])}
    comparisons.append({"arm": arm, "baseline": base, "metrics": cm})
  any_done = next(iter(done), None)
  settings = dict(seed=SEED, boot_seed=BOOT_SEED, n_boot=s["n_boot"], folds=s["folds"])
  if any_done:
    nih = np.load(out / "arms" / any_done / "nih.npz")
    cov = np.load(out / "arms" / any_done / "covid.npz")
    ret = np.load(out / "arms" / any_done / "retrieval.npz")
    settings.update(
      nih_n=int(len(nih["image_id"])),
      covid_n_train=int(cov["n_train"]),
      covid_n_test=int(len(cov["image_id"])),
      retrieval_n=int(len(ret["image_id"])),
    )
  text_init = arm_config("b", mode, out / "tfds").model.text.init
  walls = [
    v["wall_s"] for a in arms for v in ArmState(out, a).data["stages"].values() if "wall_s" in v
  ]
  return dict(
    meta=dict(
      mode=mode,
      command=command,
      metrics_file="study_metrics.json",
      machine=_machine(),
      versions=_versions(),
      git=_git(),
      finished=_now(),
      wall_s_total=float(sum(walls)),
      tensorboard=str(out / "runs"),
      settings=dict(settings, text_init=_short_path(text_init)),
      arms_not_finished=[a for a in arms if a not in done],
    ),
    arms=arm_out,
    comparisons=comparisons,
  )


def _short_path(p: str) -> str:
  parts = pathlib.Path(p).parts
  return str(pathlib.Path(*parts[-3:])) if len(parts) > 3 else p


def _machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return (
    f"{platform.machine()} {platform.system()} ({platform.release()}), "
    f"{os.cpu_count()} CPU cores visible, JAX on {len(devices)} {devices[0].platform} device(s)"
    f" ({devices[0].device_kind})"
  )


def _versions() -> dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top

  out = {"python": platform.python_version()}
  for p in ("jax", "flax", "optax", "orbax-checkpoint", "tensorflow", "scikit-learn", "numpy"):
    for dist in (p, f"{p}-cpu"):  # tensorflow-cpu on CPU-only machines
      try:
        out[p] = md.version(dist)
        break
      except md.PackageNotFoundError:
        out[p] = "not installed"
  return out


def _git() -> str:
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=REPO,
      capture_output=True,
      text=True,
    ).stdout.strip()
  except OSError:
    return "unknown"
  return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")


def write_plots(out: pathlib.Path, m: dict[str, Any], plots_dir: pathlib.Path) -> None:
  from medvl_jax.evaluate import plots, runs  # pylint: disable=g-import-not-at-top

  plots_dir.mkdir(parents=True, exist_ok=True)
  names = [k for k, _ in results.TABLE_METRICS if k.startswith(("nih", "covid"))]
  bars = []
  for a in m["arms"].values():
    flat = {}
    for k in names:
      v = a["metrics"].get(k, {})
      flat[k], flat[f"{k}_ci_lo"], flat[f"{k}_ci_hi"] = v.get("value"), v.get("lo"), v.get("hi")
    bars.append({"metrics": flat})
  plots.comparison_chart(
    plots_dir / "auc.png", bars, names, [a["title"] for a in m["arms"].values()]
  )
  curves = {}
  for arm, a in m["arms"].items():
    if a["trained"]:
      c = runs.training_curves(out / "runs" / arm / "tensorboard")
      if c:
        curves[a["title"]] = c
  plots.training_curves(plots_dir / "losses.png", curves)


def report(out: pathlib.Path, mode: str, command: str, arms: list[str]) -> dict[str, Any]:
  log("report: bootstrap CIs and paired differences ...")
  m = build_metrics(out, mode, command, arms)
  write_json(out / "study_metrics.json", m)
  write_plots(out, m, out / "plots")
  write_text(out / "RESULTS.md", results.render(m, "plots"))
  log(f"wrote {out / 'RESULTS.md'}")
  return m


def publish(out: pathlib.Path, docs: pathlib.Path) -> None:
  """OUT's metrics, plots and RESULTS.md (plot links into docs/study/) into `docs`."""
  src = out / "study_metrics.json"
  if not src.is_file():
    raise StudyError(f"{src}: not found (run the study first)")
  m = json.loads(src.read_text())
  m["meta"]["metrics_file"] = "docs/study/study_metrics.json"
  (docs / "study").mkdir(parents=True, exist_ok=True)
  write_json(docs / "study" / "study_metrics.json", m)
  for png in ("auc.png", "losses.png"):
    shutil.copyfile(out / "plots" / png, docs / "study" / png)
  write_text(docs / "RESULTS.md", results.render(m, "study"))
  log(f"wrote {docs / 'RESULTS.md'} and {docs / 'study'}/")


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="Study directory (resumed if it exists).")
  p.add_argument("--quick", action="store_true", help="Tiny variants, 4 steps (CI).")
  p.add_argument(
    "--arms",
    default=",".join(ARMS),
    help=f"Comma list of arms to run (default: all: {','.join(ARMS)}).",
  )
  p.add_argument("--publish", action="store_true", help="Copy OUT's results into docs/.")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out).absolute()
  try:
    if args.publish:
      publish(out, REPO / "docs")
      return 0
    mode = "quick" if args.quick else "full"
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
      raise StudyError(f"--arms: unknown arm {bad[0] if bad else ''!r}; valid: {', '.join(ARMS)}")
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / "study.json"
    if study_file.is_file():
      prev = json.loads(study_file.read_text())
      if prev["mode"] != mode:
        raise StudyError(
          f"{out}: holds a {prev['mode']!r} study; this command asks for {mode!r} "
          "(use another --out)"
        )
    else:
      write_json(study_file, {"mode": mode, "started": _now()})
    command = f"JAX_PLATFORMS=cpu python -m experiments.study --out={args.out}" + (
      " --quick" if args.quick else ""
    )
    _setup_runtime()
    todo = [(a, s) for a in arms for s in stages_of(a) if not ArmState(out, a).done(s)]
    log(f"{mode} study in {out}: {len(todo)} stage(s) to run over arms {', '.join(arms)}")
    eta = Eta()
    for a in arms:
      for stage, v in ArmState(out, a).data["stages"].items():
        eta.add(kind_of(a, stage), v["wall_s"])
    for i, a in enumerate(arms, 1):
      log(f"arm {i}/{len(arms)}: {a}")
      run_arm(a, out, mode, eta, todo)
    report(out, mode, command, list(ARMS))
  except StudyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from medvl_jax.errors import MedvlError  # pylint: disable=g-import-not-at-top

    if isinstance(e, MedvlError):
      print(f"error: {e}", file=sys.stderr)
      return 2
    raise
  return 0


def _setup_runtime() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/medvl_jax/xla"))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.INFO)  # training's progress and ETA lines
  logging.use_absl_handler()
  logging.get_absl_handler().addFilter(_quiet_libraries)


def _quiet_libraries(record) -> bool:
  """Drops the INFO chatter of tfds/Orbax/clu internals (their warnings stay)."""
  noisy = ("/orbax/", "/tensorflow_datasets/", "/clu/", "/etils/")
  return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


if __name__ == "__main__":
  sys.exit(main())
