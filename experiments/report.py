"""The study's report: metrics with bootstrap CIs pooled over seeds, the pre-specified paired
differences, claim 0 (training learns), the learning curves, recomputed from the saved per-row
scores (OUT/study_metrics.json); the plots, OUT/RESULTS.md (rendered by experiments/results.py),
and publishing them into docs/.

Pooling over seeds: every figure of an arm is the mean over its seeds of the figure on the same
rows; a paired difference is the mean over seeds s of (arm at seed s - baseline at seed s), the
baseline at seed s being the untrained initialisation of that seed (or, for (d) - (c), the
other arm at that seed). Its 95% CI is the percentile bootstrap of that seed-mean over the same
patient resamples for every arm and seed; the per-seed values (the seed-level spread) are saved
beside it.
"""

import json
import os
import pathlib
import platform
import shutil
import subprocess
from typing import Any

import numpy as np

from experiments import design, outputs, results

# Learning-curve tags read from each trained run's TensorBoard logs (a '*' is a prefix).
CURVE_TAGS = (
  "train_loss",
  "val_loss",
  "val_acc_t2i",
  "val_mlm_acc",
  "val_mlm",
  "val_mvm",
  "val_contrastive",
  "retrieval/t2i_R@5",
  "regeneration/psnr_gain_*",
)


def _ci(fn, groups, n_boot: int) -> dict[str, float | None]:
  from medvl_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

  ci = metrics.bootstrap_ci(fn, groups, n_boot=n_boot, seed=design.BOOT_SEED)
  return {"lo": ci["lo"], "hi": ci["hi"]}


def _metric_fns(run_dir: pathlib.Path) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
  """{metric: (fn(rows) -> value, patient groups, row ids)} from one run's saved scores."""
  from medvl_jax.evaluate import linear_probe, metrics  # pylint: disable=g-import-not-at-top

  fns = {}
  nih = np.load(run_dir / "nih.npz")
  y = nih["labels"]
  for frac in design.FRACTIONS:
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
  cov = np.load(run_dir / "covid.npz")
  for frac in design.FRACTIONS:
    tag = f"{round(frac * 100)}pct"

    def auc(r, y=cov["labels"], s=cov[f"scores_{tag}"]):
      return metrics.roc_auc(y[r], s[r], fast=True)

    fns[f"covid_auc_{tag}"] = (auc, cov["patient_id"], cov["image_id"])
  ret = np.load(run_dir / "retrieval.npz")
  for k in design.RECALL_KS:

    def recall(r, h=ret[f"hits_{k}"]):
      return float(h[r].mean())

    fns[f"t2i_R@{k}"] = (recall, ret["patient_id"], ret["image_id"])
  held = np.load(run_dir / "heldout.npz")
  fns["heldout_loss"] = (
    lambda r, v=held["contrastive_loss"]: float(v[r].mean()),
    held["patient_id"],
    held["image_id"],
  )
  if "mlm_acc" in held.files:
    fns["mlm_acc"] = (_nanmean(held["mlm_acc"]), held["patient_id"], held["image_id"])
  if (run_dir / "regeneration.npz").is_file():
    reg = np.load(run_dir / "regeneration.npz")
    if not np.array_equal(reg["patient_id"], held["patient_id"]):
      raise design.StudyError(f"{run_dir}: regeneration and heldout rows differ")
    scales = [k.removeprefix("psnr_gain_") for k in reg.files if k.startswith("psnr_gain_")]
    gain = np.mean([reg[f"psnr_gain_{s}"] for s in scales], axis=0)  # per image, scales' mean
    fns["psnr_gain"] = (lambda r, g=gain: float(g[r].mean()), reg["patient_id"], held["image_id"])
    for s in scales:
      for key in ("psnr", "psnr_gain"):
        fns[f"{key}_{s}"] = (
          lambda r, v=reg[f"{key}_{s}"]: float(v[r].mean()),
          reg["patient_id"],
          held["image_id"],
        )
  return fns


def _nanmean(v: np.ndarray):
  def fn(r):
    x = v[r]
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None

  return fn


def _pooled(fns: list, groups: np.ndarray, n_boot: int) -> dict[str, Any]:
  """The seed-mean of `fns` (one per seed, on the same rows) with its bootstrap CI and the
  per-seed values."""

  def mean(r):
    vals = [f(r) for f in fns]
    return None if any(v is None for v in vals) else float(np.mean(vals))

  n = len(groups)
  seeds = [f(np.arange(n)) for f in fns]
  seeds = [None if v is None else float(v) for v in seeds]
  value = mean(np.arange(n))
  spread = None if None in seeds or len(seeds) < 2 else float(np.std(seeds, ddof=1))
  return {"value": value, **_ci(mean, groups, n_boot), "seeds": seeds, "seed_sd": spread}


def _done_runs(out: pathlib.Path, arm: str, seeds) -> list[int]:
  return [
    k
    for k in seeds
    if all(outputs.ArmState(out, design.run_name(arm, k)).done(st) for st in design.stages_of(arm))
  ]


def _flattens(steps: list[int], values: list[float], lower_is_better: bool) -> dict[str, Any]:
  """Where a held-out curve flattens: the first evaluation step from which the remaining
  improvement to the curve's best value is under 10% of its whole improvement; the best step;
  and whether the curve ends above its best (lower_is_better: it rises again, overfitting)."""
  v = np.asarray(values, float) * (1 if lower_is_better else -1)
  if len(v) < 2:
    return {"flat_from": None, "best_step": steps[0] if steps else None, "ends_worse": False}
  best = int(np.argmin(v))
  total = v[0] - v[best]
  flat = next(i for i in range(len(v)) if v[i] - v[best] <= 0.1 * max(total, 0.0))
  return {
    "flat_from": int(steps[flat]),
    "best_step": int(steps[best]),
    "ends_worse": bool(v[-1] - v[best] > 0.1 * max(abs(total), 1e-12)),
  }


def _curves(out: pathlib.Path, arm: str, seeds: list[int]) -> dict[str, Any]:
  """{seed: {tag: [[step, value], ...]}} of a trained arm's held-out curves, and where the
  seed-mean validation loss flattens."""
  from medvl_jax.evaluate import runs  # pylint: disable=g-import-not-at-top

  per_seed = {}
  for k in seeds:
    logdir = out / "runs" / design.run_name(arm, k) / "tensorboard"
    c = runs.training_curves(logdir, CURVE_TAGS)
    per_seed[str(k)] = {tag: [[s, v] for s, v in zip(*sv)] for tag, sv in sorted(c.items())}
  flat = {}
  for tag, lower in (("val_loss", True), ("retrieval/t2i_R@5", False)):
    series = [dict(map(tuple, c[tag])) for c in per_seed.values() if tag in c]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if steps:
      mean = [float(np.mean([s[t] for s in series])) for t in steps]
      flat[tag] = _flattens(steps, mean, lower)
  return {"per_seed": per_seed, "flattening": flat}


def _arm_summary(out, mode, arm, seeds, fns, n_boot) -> dict[str, Any]:
  cfg = design.arm_config(arm, mode, out / "tfds", seeds[0])
  names = list(fns[seeds[0]])
  m = {}
  for name in names:
    groups = fns[seeds[0]][name][1]
    m[name] = _pooled([fns[k][name][0] for k in seeds], groups, n_boot)
  per_label = {
    tag: {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"nih_auc_{tag}/")}
    for tag in ("10pct", "100pct")
  }
  walls = [outputs.ArmState(out, design.run_name(arm, k)).data["stages"] for k in seeds]
  image, text = cfg.model.image, cfg.model.text
  text_desc = f"MiniLM text ({text.init_layers or 6} layers)"
  model = (
    f"{image.variant} + {text_desc}"
    if cfg.model.name == "convirt"
    else f"ViT (patch {image.patch_size}, width {image.hidden_size}, {image.num_layers} layers)"
    f" + {text_desc}, fusion, decoder"
  )
  trained = design.ARMS[arm]["train"]
  return dict(
    title=design.ARMS[arm]["title"],
    short=design.ARMS[arm]["short"],
    model=f"{model}, {int(cfg.data.image_size)} px",
    data=design.ARMS[arm]["data"],
    trained=trained,
    seeds=list(seeds),
    steps=int(cfg.total_steps),
    selected_steps=[w.get("train", {}).get("selected_step") for w in walls] if trained else None,
    batch_size=int(cfg.batch_size),
    lr=float(cfg.optimizer.lr),
    wall_train_s=sum(w.get("train", {}).get("wall_s", 0.0) for w in walls) if trained else None,
    wall_eval_s=sum(v["wall_s"] for w in walls for k, v in w.items() if k != "train"),
    metrics={k: v for k, v in m.items() if "/" not in k},
    nih_per_label=per_label,
    curves=_curves(out, arm, seeds) if trained else None,
  )


def build_metrics(out: pathlib.Path, mode: str, command: str, arms: list[str]) -> dict[str, Any]:
  s = design.SETTINGS[mode]
  seeds_of = {a: _done_runs(out, a, s["seeds"]) for a in arms}
  done = [a for a in arms if seeds_of[a] == list(s["seeds"])]
  fns = {
    a: {k: _metric_fns(out / "arms" / design.run_name(a, k)) for k in seeds_of[a]} for a in done
  }
  arm_out = {a: _arm_summary(out, mode, a, seeds_of[a], fns[a], s["n_boot"]) for a in done}
  comparisons = []
  for arm, base in design.COMPARISONS:
    if arm not in fns or base not in fns:
      continue
    cm = {}
    seeds = seeds_of[arm]
    for name, (_, groups, ids) in fns[arm][seeds[0]].items():
      if "/" in name or name not in fns[base][seeds[0]]:
        continue
      for k in seeds:
        _, groups_b, ids_b = fns[base][k][name]
        if not np.array_equal(ids, ids_b) or not np.array_equal(groups, groups_b):
          raise design.StudyError(f"{name}: arms {arm} and {base} were evaluated on different rows")

      def diff_fn(k, name=name, arm=arm, base=base):
        fa, fb = fns[arm][k][name][0], fns[base][k][name][0]

        def diff(r):
          va, vb = fa(r), fb(r)
          return None if va is None or vb is None else va - vb

        return diff

      cm[name] = _pooled([diff_fn(k) for k in seeds], groups, s["n_boot"])
    comparisons.append({"arm": arm, "baseline": base, "metrics": cm})
  settings = dict(
    seeds=list(s["seeds"]), boot_seed=design.BOOT_SEED, n_boot=s["n_boot"], folds=s["folds"]
  )
  if done:
    first = out / "arms" / design.run_name(done[0], seeds_of[done[0]][0])
    nih = np.load(first / "nih.npz")
    cov = np.load(first / "covid.npz")
    ret = np.load(first / "retrieval.npz")
    settings.update(
      nih_n=int(len(nih["image_id"])),
      nih_patients=int(len(np.unique(nih["patient_id"]))),
      covid_n_train=int(cov["n_train"]),
      covid_n_test=int(len(cov["image_id"])),
      retrieval_n=int(len(ret["image_id"])),
      heldout_patients=int(len(np.unique(ret["patient_id"]))),
    )
  text_init = design.arm_config("b", mode, out / "tfds", 0).model.text.init
  walls = [
    v["wall_s"]
    for a in arms
    for k in s["seeds"]
    for v in outputs.ArmState(out, design.run_name(a, k)).data["stages"].values()
    if "wall_s" in v
  ]
  return dict(
    meta=dict(
      mode=mode,
      command=command,
      metrics_file="study_metrics.json",
      machine=_machine(),
      versions=_versions(),
      git=_git(),
      finished=outputs.now(),
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
      ["git", "rev-parse", "--short=12", "HEAD"], cwd=design.REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=design.REPO,
      capture_output=True,
      text=True,
    ).stdout.strip()
  except OSError:
    return "unknown"
  return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")


def write_plots(m: dict[str, Any], plots_dir: pathlib.Path) -> None:
  from medvl_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

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
  learning_curves(m, plots_dir / "curves.png")


def learning_curves(m: dict[str, Any], path: pathlib.Path) -> None:
  """One panel per held-out curve (validation loss, text->image R@5, MLM accuracy, PSNR gain
  of the coarsest scale), a line per trained arm (the seed mean; each seed faint)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  trained = {n: a for n, a in m["arms"].items() if a["trained"] and a["curves"]}
  tags = ["val_loss", "retrieval/t2i_R@5", "val_mlm_acc"]
  gains = sorted(
    {
      t
      for a in trained.values()
      for c in a["curves"]["per_seed"].values()
      for t in c
      if t.startswith("regeneration/psnr_gain_") and "_ci_" not in t
    }
  )
  tags += gains[-1:]
  fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4))
  for ax, tag in zip(np.atleast_1d(axes), tags):
    for i, a in enumerate(trained.values()):
      colour = f"C{i}"
      series = [c[tag] for c in a["curves"]["per_seed"].values() if tag in c]
      for s in series:
        ax.plot(*zip(*s), color=colour, alpha=0.25, lw=0.8)
      if series:
        steps = sorted(set.intersection(*(set(x for x, _ in s) for s in series)))
        mean = [np.mean([dict(map(tuple, s))[t] for s in series]) for t in steps]
        ax.plot(steps, mean, color=colour, lw=1.8, label=a["short"])
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.tight_layout()
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def report(out: pathlib.Path, mode: str, command: str, arms: list[str]) -> dict[str, Any]:
  outputs.log("report: bootstrap CIs, pooled paired differences and learning curves ...")
  m = build_metrics(out, mode, command, arms)
  outputs.write_json(out / "study_metrics.json", m)
  write_plots(m, out / "plots")
  outputs.write_text(out / "RESULTS.md", results.render(m, "plots"))
  outputs.log(f"wrote {out / 'RESULTS.md'}")
  return m


def publish(out: pathlib.Path, docs: pathlib.Path) -> None:
  """OUT's metrics, plots and RESULTS.md (plot links into docs/study/) into `docs`."""
  src = out / "study_metrics.json"
  if not src.is_file():
    raise design.StudyError(f"{src}: not found (run the study first)")
  m = json.loads(src.read_text())
  name = f"study_metrics_{m['meta']['mode']}.json"
  m["meta"]["metrics_file"] = f"docs/study/{name}"
  (docs / "study").mkdir(parents=True, exist_ok=True)
  outputs.write_json(docs / "study" / name, m)
  for png in ("auc.png", "curves.png"):
    shutil.copyfile(out / "plots" / png, docs / "study" / png)
  outputs.write_text(docs / "RESULTS.md", results.render(m, "study"))
  scores = copy_scores(out, docs / "study" / f"scores_{m['meta']['mode']}")
  outputs.log(f"wrote {docs / 'RESULTS.md'} and {docs / 'study'}/ ({scores} score files)")


def _train_done(out: pathlib.Path, run: tuple[str, ...]) -> bool:
  """Whether OUT/arms/<arm>/<seedK>/state.json records a finished training (read only)."""
  state = out.joinpath("arms", *run, "state.json")
  return state.is_file() and "train" in json.loads(state.read_text())["stages"]


def copy_scores(out: pathlib.Path, dest: pathlib.Path) -> int:
  """OUT's per-row score files and state (arms/) and each run's TensorBoard events
  (runs/*/seed*/tensorboard/), no checkpoints: everything the report reads, so that a fresh OUT
  seeded with `dest`'s contents reports the same and resumes only the stages not done. The copy
  is assembled beside `dest` and swapped in whole (`paths.install_dir`). Returns the number of
  files copied."""
  from medvl_jax import paths  # pylint: disable=g-import-not-at-top

  tmp = dest.with_name(dest.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  files = [p for p in sorted((out / "arms").rglob("*")) if p.is_file()]
  # Only finished trainings' events: a run still training (or killed) is redone from scratch
  # in a seeded OUT (no checkpoint is copied), and its partial events would double its curve.
  files += [
    p
    for p in sorted((out / "runs").glob("*/seed*/tensorboard/**/*"))
    if p.is_file() and _train_done(out, p.relative_to(out / "runs").parts[:2])
  ]
  for f in files:
    target = tmp / f.relative_to(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, target)
  paths.install_dir(str(tmp), str(dest), lambda _: None)  # the published copy is ours to replace
  return len(files)
