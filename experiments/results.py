"""docs/RESULTS.md of the study, rendered from its saved metrics (`study_metrics.json`).

Pure: no JAX, no data. `render(metrics)` is the only way the Markdown is written (by
`experiments/study.py` at the end of every run, and by the test that regenerates it from the
saved file and diffs it), so every number in the document comes from the metrics file.

Decision rule (stated in the document): a claim is *supported* when the 95% bootstrap CI of its
paired difference lies entirely above 0, *not supported* when it lies entirely below 0, and
*inconclusive* when it contains 0 (or is undefined).
"""

from typing import Any

# Metrics in the main table, in order: (key, column title).
TABLE_METRICS = (
  ("nih_auc_10pct", "NIH-14 macro AUC, 10% labels"),
  ("nih_auc_100pct", "NIH-14 macro AUC, 100% labels"),
  ("covid_auc_10pct", "COVID-19 probe AUC, 10% labels"),
  ("covid_auc_100pct", "COVID-19 probe AUC, 100% labels"),
  ("t2i_R@1", "text→image R@1"),
  ("t2i_R@5", "text→image R@5"),
  ("t2i_R@10", "text→image R@10"),
)
# Claim 0's held-out figures: (key, title, which way is better).
LEARNING_METRICS = (
  ("heldout_loss", "held-out contrastive loss", "lower"),
  ("t2i_R@5", "text→image R@5", "higher"),
  ("psnr_gain", "masked-patch PSNR gain over mean fill (dB)", "higher"),
  ("mlm_acc", "held-out MLM accuracy", "higher"),
)
# Claim 0, decided first: each trained family beats its own untrained initialisation on
# held-out patients, on every deciding figure (trained arm at seed s vs the untrained arm of its
# architecture at seed s, which is that run's initialisation).
CLAIM0 = (
  dict(arm="b", baseline="a_resnet", metrics=("heldout_loss", "t2i_R@5")),
  dict(arm="d", baseline="a_vit", metrics=("psnr_gain", "mlm_acc")),
)
# The claims of the two seed papers and the pre-specified comparison that decides each.
CLAIMS = (
  dict(
    title="Image–text pretraining gives a better image encoder than no pretraining, above all "
    "with few labels (ConVIRT)",
    arm="b",
    baseline="a_resnet",
    metric="nih_auc_10pct",
    secondary=(("b", "a_resnet", "nih_auc_100pct"), ("b", "a_resnet", "covid_auc_10pct")),
  ),
  dict(
    title="Adding unpaired images and texts to the paired data helps further (mixed-data paper)",
    arm="d",
    baseline="c",
    metric="nih_auc_10pct",
    secondary=(("d", "c", "nih_auc_100pct"), ("d", "c", "covid_auc_10pct")),
  ),
)


def verdict(lo: float | None, hi: float | None, better: str = "higher") -> str:
  """The document's rule on a paired difference's 95% CI (`better`: which sign is a gain)."""
  if lo is None or hi is None:
    return "inconclusive"
  if better == "lower":
    lo, hi = -hi, -lo
  if lo > 0:
    return "supported"
  if hi < 0:
    return "not supported"
  return "inconclusive"


def claim0_verdict(metrics: dict[str, Any], claim: dict[str, Any]) -> tuple[str, list]:
  """(verdict, [(key, title, better, difference or None, its verdict)]): supported when every
  deciding figure is supported, not supported when any is not supported, else inconclusive."""
  c = _comparison(metrics, claim["arm"], claim["baseline"])
  rows = []
  for key, title, better in LEARNING_METRICS:
    if key in claim["metrics"]:
      m = c["metrics"].get(key) if c else None
      rows.append((key, title, better, m, verdict(m["lo"], m["hi"], better) if m else None))
  verdicts = [r[4] for r in rows]
  if verdicts and all(v == "supported" for v in verdicts):
    return "supported", rows
  if "not supported" in verdicts:
    return "not supported", rows
  return "inconclusive", rows


def _f(v: float | None, digits: int = 3) -> str:
  return "n/a" if v is None else f"{v:.{digits}f}"


def _cell(m: dict[str, Any] | None, signed: bool = False) -> str:
  if not m or m.get("value") is None:
    return "n/a"
  fmt = "+.3f" if signed else ".3f"
  v = f"{m['value']:{fmt}}"
  if m.get("lo") is None or m.get("hi") is None:
    return v
  return f"{v} [{m['lo']:{fmt}}, {m['hi']:{fmt}}]"


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "n/a"
  s = int(round(seconds))
  return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"


def _comparison(metrics: dict[str, Any], arm: str, baseline: str) -> dict[str, Any] | None:
  for c in metrics.get("comparisons", []):
    if c["arm"] == arm and c["baseline"] == baseline:
      return c
  return None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out


def _seeds(m: dict[str, Any] | None, signed: bool = True) -> str:
  """The per-seed values and their SD (the seed-level spread beside the pooled CI)."""
  if not m or not m.get("seeds") or any(v is None for v in m["seeds"]):
    return "n/a"
  fmt = "+.3f" if signed else ".3f"
  vals = ", ".join(f"{v:{fmt}}" for v in m["seeds"])
  sd = "" if m.get("seed_sd") is None else f" (SD {m['seed_sd']:.3f})"
  return vals + sd


def _steps_cell(a: dict[str, Any]) -> str:
  """Trained steps, and the step evaluated per seed (lowest validation loss)."""
  if not a["trained"]:
    return "0 (initialisation)"
  chosen = a.get("selected_steps") or []
  if not chosen or None in chosen:
    return str(a["steps"])
  return f"{a['steps']}; evaluated at {', '.join(map(str, chosen))}"


def _claim0_lines(metrics: dict[str, Any], quick: bool) -> list[str]:
  arms = metrics["arms"]
  lines = ["## Claim 0: training learns", ""]
  lines += [
    "Pre-specified and decided first: on the held-out test patients, each trained family "
    "(at its checkpoint of lowest validation loss, chosen on the validation patients) beats "
    "its own untrained initialisation — ConVIRT (b) on the contrastive loss and text→image R@5, "
    "the mixed model (d) on the masked-patch PSNR gain over mean fill and the MLM accuracy. "
    "Supported when the 95% CI of every deciding difference (trained − untrained, pooled over "
    "seeds) lies on the better side of 0; not supported when any lies on the worse side.",
    "",
  ]
  for claim in CLAIM0:
    v, rows = claim0_verdict(metrics, claim)
    if claim["arm"] not in arms or claim["baseline"] not in arms:
      lines += [f"- ({claim['arm']}): not run.", ""]
      continue
    name = f"{arms[claim['arm']]['short']} − {arms[claim['baseline']]['short']}"
    lines += [f"- **{arms[claim['arm']]['title']}: {v}.** {name}:"]
    for _, title, better, m, vv in rows:
      lines += [
        f"  {title} ({better} is better): {_cell(m, signed=True)} ({vv}); per seed {_seeds(m)}"
      ]
    lines += [""]
  header = ["trained − untrained"] + [f"{t} ({b})" for _, t, b in LEARNING_METRICS]
  rows = []
  for c in metrics.get("comparisons", []):
    if arms[c["baseline"]]["trained"]:
      continue
    cells = []
    for key, _, better in LEARNING_METRICS:
      m = c["metrics"].get(key)
      cells.append(
        "n/a"
        if not m or m.get("value") is None
        else f"{_cell(m, signed=True)} ({verdict(m['lo'], m['hi'], better)})"
      )
    rows.append([f"{arms[c['arm']]['short']} − {arms[c['baseline']]['short']}"] + cells)
  lines += ["All trained arms against their initialisation (context for the deciding rows):", ""]
  lines += _table(header, rows)
  lines += ["", "Difference [95% CI] (verdict by the rule).", ""]
  if quick:
    lines += ["In quick mode a few steps decide nothing; the verdicts only show the rule.", ""]
  return lines


def _curve_lines(metrics: dict[str, Any], plots_dir: str) -> list[str]:
  arms = metrics["arms"]
  lines = ["## Learning curves", ""]
  lines += [
    f"![held-out curves of every trained arm]({plots_dir}/curves.png)",
    "",
    "Every trained run evaluates on held-out patients (`covid_cxr_notes` validation split) "
    "at regular steps and keeps a checkpoint at each; the study evaluates the one of lowest "
    "validation loss (the *steps* column of the arms' table); the curves of each seed are "
    "saved in the metrics file (`arms.<arm>.curves.per_seed`). A curve *flattens* at the "
    "first evaluation from which less than 10% of its whole improvement remains (seed "
    "mean); *best* is the step of its best value; *ends worse* means its last value is "
    "worse than its best by more than 10% of its improvement (for a loss: overfitting).",
    "",
  ]
  rows = []
  for a in arms.values():
    if not a["trained"] or not a.get("curves"):
      continue
    for tag, f in a["curves"]["flattening"].items():
      rows.append(
        [
          a["title"],
          tag,
          "n/a" if f["flat_from"] is None else str(f["flat_from"]),
          "n/a" if f["best_step"] is None else str(f["best_step"]),
          "yes" if f["ends_worse"] else "no",
        ]
      )
  lines += _table(["arm", "curve", "flattens at step", "best at step", "ends worse"], rows)
  lines += [""]
  return lines


def _user_lines(metrics: dict[str, Any]) -> list[str]:
  """What the figures mean for a user with MIMIC-CXR (from the verdicts, not by hand)."""
  v0 = [claim0_verdict(metrics, c)[0] for c in CLAIM0]
  learns = all(v == "supported" for v in v0)
  lines = ["## What this means for a user with MIMIC-CXR", ""]
  if learns:
    lines += [
      "- Both training recipes learn on a few hundred real pairs on a CPU: held-out figures "
      "move well away from the initialisation and the curves flatten within the run "
      "(table above). At MIMIC-CXR scale (~377k images, ~227k reports) expect the same "
      "direction with much longer curves; use the validation loss to choose the length, "
      "as ConVIRT did.",
    ]
  else:
    failed = [
      (metrics["arms"][c["arm"]]["title"] if c["arm"] in metrics["arms"] else f"({c['arm']})")
      + f" ({v})"
      for c, v in zip(CLAIM0, v0)
      if v != "supported"
    ]
    lines += [
      f"- Claim 0 is not shown for {' and '.join(failed)} here (above); read the other "
      "claims with that in mind: a family that is not shown to learn on this data cannot "
      "show a gain downstream.",
    ]
  lines += [
    "- What this study cannot say: the size of the gains at MIMIC-CXR scale, with full-size "
    "models or ImageNet-initialised image towers; the probes have a few hundred images, so "
    "small differences are within their CIs. The samples are research data, not clinical "
    "data: nothing here is evidence for diagnostic use.",
    "",
  ]
  return lines


def render(metrics: dict[str, Any], plots_dir: str = "plots") -> str:
  """The Markdown document for a study's metrics (`study_metrics*.json`'s dict); plot links
  point into `plots_dir` (relative to the document)."""
  meta, arms = metrics["meta"], metrics["arms"]
  quick = meta["mode"] == "quick"
  lines = ["# Study: does training learn here, does pretraining help, and does unpaired data add?"]
  lines += [
    "",
    "Generated by `experiments/study.py` from its saved metrics "
    f"(`{meta['metrics_file']}`); do not edit by hand.",
    "",
  ]
  banner = {
    "quick": "Tiny model variants trained for a few steps (a CI-sized check that the whole "
    "study runs end to end). These numbers say nothing about the claims; the verdicts below "
    "only show the rules at work.",
    "small": "The configs' `small` models (docs/study.md), trained for thousands of steps "
    "on the bundled samples with several seeds: a small-scale check of direction, not a "
    "benchmark.",
    "full": "Full-size models at the configs' own short lengths, on the bundled samples.",
  }[meta["mode"]]
  lines += [f"> **Mode: {meta['mode']}.** {banner}", ""]
  if meta.get("arms_not_finished"):
    lines += [
      "> **Not finished:** arms "
      + ", ".join(f"`{a}`" for a in meta["arms_not_finished"])
      + " (every seed of an arm must be done for it to appear); what needs them is marked "
      "not run below.",
      "",
    ]
  lines += _claim0_lines(metrics, quick)
  lines += _curve_lines(metrics, plots_dir)
  lines += ["## Claims 1 and 2", ""]
  lines += [
    "Rule: a claim is **supported** when the 95% CI of its pre-specified paired difference "
    "(pooled over seeds) lies entirely above 0, **not supported** when it lies entirely "
    "below 0, and **inconclusive** when it contains 0. The deciding comparison is named for "
    "each claim; the others are shown for context and decide nothing (no correction for "
    "multiple comparisons is made).",
    "",
  ]
  for i, claim in enumerate(CLAIMS, 1):
    c = _comparison(metrics, claim["arm"], claim["baseline"])
    m = c["metrics"].get(claim["metric"]) if c else None
    v = verdict(m.get("lo"), m.get("hi")) if m else "inconclusive"
    name = dict(TABLE_METRICS)[claim["metric"]]
    short = f"{arms[claim['arm']]['short']} − {arms[claim['baseline']]['short']}" if c else ""
    lines += [f"{i}. **{claim['title']}: {v}{' at this scale' if not quick else ''}.**"]
    if m is None:
      lines += ["   The arms needed for this comparison were not run."]
    else:
      lines += [f"   Deciding: {short}, {name}: {_cell(m, signed=True)}; per seed {_seeds(m)}."]
      ctx = []
      for arm, base, key in claim["secondary"]:
        cc = _comparison(metrics, arm, base)
        mm = cc["metrics"].get(key) if cc else None
        if mm:
          ctx.append(
            f"{arms[arm]['short']} − {arms[base]['short']}, {dict(TABLE_METRICS)[key]}: "
            f"{_cell(mm, signed=True)} ({verdict(mm.get('lo'), mm.get('hi'))})"
          )
      if ctx:
        lines += ["   Context: " + "; ".join(ctx) + "."]
    lines += [""]
  lines += _user_lines(metrics)
  lines += ["## How it was run", ""]
  lines += ["```", meta["command"], "```", ""]
  settings = meta["settings"]
  lines += [
    f"- Machine: {meta['machine']}",
    f"- Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
    f"- Code: git {meta['git']}",
    f"- Wall time (all stages, summed over resumes): {_duration(meta['wall_s_total'])}; "
    f"finished {meta['finished']}",
    f"- Seeds: training seeds {', '.join(map(str, settings['seeds']))} for every arm (an "
    "untrained arm at seed s is the initialisation of the trained arms at seed s). Pooling: "
    "each figure is the mean over seeds on the same rows; a paired difference is the mean "
    "over seeds of the per-seed differences, its 95% CI the percentile bootstrap of that "
    f"mean over {settings['n_boot']} resamples of patients (seed {settings['boot_seed']}, "
    "the same resamples for every arm, seed and difference); the per-seed values and their "
    "SD are shown beside it.",
    f"- TensorBoard: `tensorboard --logdir {meta['tensorboard']}` (one sub-directory per "
    "trained arm and seed)",
    "",
  ]
  lines += ["## Arms", ""]
  rows = []
  for a in arms.values():
    rows.append(
      [
        a["title"],
        a["model"],
        a["data"],
        _steps_cell(a),
        f"{a['batch_size']}, lr {a['lr']:g}" if a["trained"] else "-",
        ", ".join(map(str, a["seeds"])),
        _duration(a["wall_train_s"]) if a["trained"] else "-",
        _duration(a["wall_eval_s"]),
      ]
    )
  lines += _table(
    [
      "arm",
      "model",
      "pretraining data",
      "steps",
      "batch, lr",
      "seeds",
      "train wall (all seeds)",
      "eval wall",
    ],
    rows,
  )
  lines += [
    "",
    "Every arm with a text tower starts it from the bundled MiniLM checkpoint "
    f"(`{settings['text_init']}`); image towers start from random initialisation. The "
    "(a) arms are the two image architectures at their initialisation (no training); "
    "each trained arm is compared with the (a) arm of its own architecture.",
    "",
  ]
  lines += ["## Evaluation", ""]
  lines += [
    f"- **NIH-14 linear probe** on the evaluation half of `nih14_sample` "
    f"({settings['nih_n']} images of {settings['nih_patients']} patients; the other half, "
    "split by patient, is the image-only pretraining data of arms (d) and (e), so no arm is "
    "probed on an image it saw): frozen pooled image features, standardised on the training "
    f"folds; {settings['folds']}-fold cross-validation by patient; per label an L2 logistic "
    "regression fitted on a stratified 10% or 100% of the training folds; AUC of the pooled "
    "out-of-fold scores, per label and as the macro mean over the 14 labels.",
    f"- **COVID-19 probe** (`covid_cxr_notes`, frontal views, 'todo' findings dropped): "
    f"COVID-19 vs other findings, trained on the {settings['covid_n_train']} training-split "
    f"images, tested on the {settings['covid_n_test']} images of held-out (validation + "
    "test) patients; 10% and 100% of the training labels (the validation patients choose "
    "each trained run's checkpoint by its contrastive/masked losses, never by these labels).",
    f"- **Text→image retrieval**: the {settings['retrieval_n']} notes of the test patients "
    f"({settings['heldout_patients']} patients) against their images; a hit when the image "
    "belongs to the note's patient; Recall@k.",
    "- **Held-out contrastive loss** (claim 0): each test pair's ConVIRT loss against all "
    "test pairs, with the training loss's λ and temperature.",
    "- **Held-out MLM accuracy** (mixed arms, claim 0): the share of masked tokens of each "
    "test patient's note predicted exactly (text alone, the same masked tokens for every arm).",
    "- **Masked-patch regeneration** (mixed arms): the evaluation suite's `regeneration` "
    "task on the test patients' paired images; PSNR over the masked pixels per mask scale, and its "
    "gain over filling the holes with the visible mean (claim 0: the mean over scales).",
    "- 95% CIs: percentile bootstrap over test patients (the suite's `metrics.bootstrap_ci`). "
    "A paired difference is computed on each resample from the same rows of both arms, so "
    "its CI comes from the same resamples as the arms' own.",
    "",
  ]
  lines += ["## Results", ""]
  header = ["arm"] + [t for _, t in TABLE_METRICS]
  rows = [
    [a["title"]] + [_cell(a["metrics"].get(k)) for k, _ in TABLE_METRICS] for a in arms.values()
  ]
  lines += _table(header, rows)
  lines += ["", "Value [95% CI], pooled over seeds.", ""]
  lines += ["### Paired differences", ""]
  header = ["difference"] + [t for _, t in TABLE_METRICS]
  rows = []
  for c in metrics.get("comparisons", []):
    cells = []
    for k, _ in TABLE_METRICS:
      m = c["metrics"].get(k)
      cell = _cell(m, signed=True)
      if m and m.get("value") is not None:
        cell += f" ({verdict(m.get('lo'), m.get('hi'))})"
      cells.append(cell)
    rows.append([f"{arms[c['arm']]['short']} − {arms[c['baseline']]['short']}"] + cells)
  lines += _table(header, rows)
  lines += ["", "Difference [95% CI] (verdict by the rule).", ""]
  regen = {n: a for n, a in arms.items() if "psnr_gain" in a["metrics"]}
  if regen:
    lines += ["### Masked-patch regeneration (test patients' paired images)", ""]
    scales = sorted(
      {
        k.removeprefix("psnr_gain_")
        for a in regen.values()
        for k in a["metrics"]
        if k.startswith("psnr_gain_")
      }
    )
    header = (
      ["arm"] + [f"PSNR {s} (dB)" for s in scales] + [f"gain over mean fill, {s}" for s in scales]
    )
    rows = []
    for a in regen.values():
      m = a["metrics"]
      rows.append(
        [a["title"]]
        + [_cell(m.get(f"psnr_{s}")) for s in scales]
        + [_cell(m.get(f"psnr_gain_{s}"), signed=True) for s in scales]
      )
    lines += _table(header, rows)
    lines += [""]
  per_label = {n: a for n, a in arms.items() if a.get("nih_per_label")}
  if per_label:
    for tag, title in (("10pct", "10% labels"), ("100pct", "100% labels")):
      lines += [f"### NIH-14 per-label AUC, {title}", ""]
      labels = list(next(iter(per_label.values()))["nih_per_label"][tag])
      header = ["label"] + [a["short"] for a in per_label.values()]
      rows = [
        [lab] + [_cell(a["nih_per_label"][tag].get(lab)) for a in per_label.values()]
        for lab in labels
      ]
      lines += _table(header, rows)
      lines += [""]
  lines += ["## Plots", "", f"![per-arm AUC with 95% CIs]({plots_dir}/auc.png)", ""]
  return "\n".join(lines)
