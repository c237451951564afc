"""The study's report: metrics with bootstrap CIs and the pre-specified paired differences,
recomputed from the arms' saved scores (OUT/study_metrics.json), the plots, OUT/RESULTS.md
(rendered by experiments/results.py), and publishing them into docs/."""

import json
import os
import pathlib
import platform
import shutil
import subprocess
from typing import Any

import numpy as np

from experiments import design, outputs, results


def _ci(fn, groups, n_boot: int) -> dict[str, float | None]:
  from medvl_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

  ci = metrics.bootstrap_ci(fn, groups, n_boot=n_boot, seed=design.BOOT_SEED)
  return {"lo": ci["lo"], "hi": ci["hi"]}


def _metric_fns(arm_dir: pathlib.Path) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
  """{metric: (fn(rows) -> value, patient groups, row ids)} from an arm's saved scores."""
  from medvl_jax.evaluate import linear_probe, metrics  # pylint: disable=g-import-not-at-top

  fns = {}
  nih = np.load(arm_dir / "nih.npz")
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
  cov = np.load(arm_dir / "covid.npz")
  for frac in design.FRACTIONS:
    tag = f"{round(frac * 100)}pct"

    def auc(r, y=cov["labels"], s=cov[f"scores_{tag}"]):
      return metrics.roc_auc(y[r], s[r], fast=True)

    fns[f"covid_auc_{tag}"] = (auc, cov["patient_id"], cov["image_id"])
  ret = np.load(arm_dir / "retrieval.npz")
  for k in design.RECALL_KS:

    def recall(r, h=ret[f"hits_{k}"]):
      return float(h[r].mean())

    fns[f"t2i_R@{k}"] = (recall, ret["patient_id"], ret["image_id"])
  return fns


def _value(fn, n: int) -> float | None:
  v = fn(np.arange(n))
  return None if v is None else float(v)


def build_metrics(out: pathlib.Path, mode: str, command: str, arms: list[str]) -> dict[str, Any]:
  s = design.SETTINGS[mode]
  done = [a for a in arms if all(outputs.ArmState(out, a).done(st) for st in design.stages_of(a))]
  fns = {a: _metric_fns(out / "arms" / a) for a in done}
  arm_out = {}
  for a in done:
    st = outputs.ArmState(out, a).data["stages"]
    cfg = design.arm_config(a, mode, out / "tfds")
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
      title=design.ARMS[a]["title"],
      short=design.ARMS[a]["short"],
      model=f"{model}, {int(cfg.data.image_size)} px",
      data=design.ARMS[a]["data"],
      trained=design.ARMS[a]["train"],
      steps=int(cfg.total_steps),
      batch_size=int(cfg.batch_size),
      wall_train_s=st.get("train", {}).get("wall_s"),
      wall_eval_s=sum(v["wall_s"] for k, v in st.items() if k != "train"),
      metrics=main,
      nih_per_label=per_label,
      regeneration=regen,
    )
  comparisons = []
  for arm, base in design.COMPARISONS:
    if arm not in fns or base not in fns:
      continue
    cm = {}
    for name, (fa, groups, ids) in fns[arm].items():
      if "/" in name:
        continue
      fb, groups_b, ids_b = fns[base][name]
      if not np.array_equal(ids, ids_b) or not np.array_equal(groups, groups_b):
        raise design.StudyError(f"{name}: arms {arm} and {base} were evaluated on different rows")

      def diff(r, fa=fa, fb=fb):
        va, vb = fa(r), fb(r)
        return None if va is None or vb is None else va - vb

      cm[name] = {"value": _value(diff, len(groups)), **_ci(diff, groups, s["n_boot"])}
    comparisons.append({"arm": arm, "baseline": base, "metrics": cm})
  any_done = next(iter(done), None)
  settings = dict(
    seed=design.SEED, boot_seed=design.BOOT_SEED, n_boot=s["n_boot"], folds=s["folds"]
  )
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
  text_init = design.arm_config("b", mode, out / "tfds").model.text.init
  walls = [
    v["wall_s"]
    for a in arms
    for v in outputs.ArmState(out, a).data["stages"].values()
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
  outputs.log("report: bootstrap CIs and paired differences ...")
  m = build_metrics(out, mode, command, arms)
  outputs.write_json(out / "study_metrics.json", m)
  write_plots(out, m, out / "plots")
  outputs.write_text(out / "RESULTS.md", results.render(m, "plots"))
  outputs.log(f"wrote {out / 'RESULTS.md'}")
  return m


def publish(out: pathlib.Path, docs: pathlib.Path) -> None:
  """OUT's metrics, plots and RESULTS.md (plot links into docs/study/) into `docs`."""
  src = out / "study_metrics.json"
  if not src.is_file():
    raise design.StudyError(f"{src}: not found (run the study first)")
  m = json.loads(src.read_text())
  m["meta"]["metrics_file"] = "docs/study/study_metrics.json"
  (docs / "study").mkdir(parents=True, exist_ok=True)
  outputs.write_json(docs / "study" / "study_metrics.json", m)
  for png in ("auc.png", "losses.png"):
    shutil.copyfile(out / "plots" / png, docs / "study" / png)
  outputs.write_text(docs / "RESULTS.md", results.render(m, "study"))
  outputs.log(f"wrote {docs / 'RESULTS.md'} and {docs / 'study'}/")
