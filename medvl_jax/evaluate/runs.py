"""Evaluating a training run's checkpoint on a task, and comparing evaluations: the library
behind `python -m medvl_jax.evaluate` (medvl_jax/evaluate/__main__.py), also used by the study.

`evaluate_run` writes OUT/metrics.json ({'task', 'step', 'workdir', 'cfg', 'metrics'}) and the
task's PNGs; OUT defaults to WORKDIR/eval/<task>-step<N>. WORKDIR and OUT may be gs:// URLs
(`medvl_jax.paths`). A local OUT is written into a sibling temporary directory renamed into
place when complete, so it never holds a partial result; a gs:// OUT gets metrics.json last,
and a folder without it is incomplete. Task settings: the run's `config.evaluators` entry of
that name (if any), then each `key=value` override (Python literal or string).
`compare_table` / `compare_chart` put several evaluations side by side; `training_curves`
reads a run's loss curves from its TensorBoard logs.
"""

import ast
from collections.abc import Sequence
import json
import pathlib
import tempfile
import types
from typing import Any

from medvl_jax import paths
from medvl_jax.errors import ConfigError, MedvlError, OutputError

METRICS = "metrics.json"  # written last: an OUT without it is incomplete


def task_config(config: Any, task: str, overrides: list[str]) -> dict[str, Any]:
  cfg = {}
  for entry in config.evaluators or []:
    entry = dict(entry)
    if entry.pop("name", None) == task:
      cfg.update(entry)
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"--cfg {item!r}: expected key=value")
    try:
      cfg[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      cfg[key] = value
  return cfg


def build_evaluator(encoders: Any, task: str, cfg: dict[str, Any]) -> Any:
  from medvl_jax import evaluate  # pylint: disable=g-import-not-at-top

  cls = evaluate.get(task)
  try:
    return cls(encoders, **cfg)
  except TypeError as e:
    raise ConfigError(f"task {task!r}: bad setting: {e}") from e


def load_run(workdir: str | pathlib.Path, step: int | None):
  """(config, encoders, state, step) of a run's checkpoint, without optimizer state."""
  from medvl_jax import families
  from medvl_jax.ckpt import run_dir
  from medvl_jax.data import tokenizer as tokenizer_lib
  from medvl_jax.evaluate import features  # pylint: disable=g-import-not-at-top

  config = run_dir.load_run_config(workdir)
  model = families.get(config.model.name).build(config.model)
  step, params, batch_stats = run_dir.restore_variables(workdir, config, model, step)
  tokenizer = tokenizer_lib.from_config(config)
  encoders = features.Encoders(model, config, tokenizer)
  return config, encoders, types.SimpleNamespace(params=params, batch_stats=batch_stats), step


def _check_replaceable(existing: str) -> None:
  if not paths.isfile(paths.join(existing, METRICS)):
    raise ConfigError(
      f"{existing}: exists, is not empty and holds no metrics.json; refusing to replace it"
    )


def evaluate_run(
  workdir: str,
  task: str,
  step: int | None = None,
  out: str | None = None,
  overrides: list[str] = (),
) -> tuple[str, dict[str, Any]]:
  """Runs `task` on checkpoint `step` (default: latest); returns (OUT, metrics.json's dict)."""
  from medvl_jax import evaluate  # pylint: disable=g-import-not-at-top

  evaluate.get(task)  # Unknown task: fail before loading anything.
  workdir = paths.absolute(workdir)
  out = paths.absolute(out) if out else None
  paths.check_reachable(workdir)  # a bad URL: one line within seconds, not minutes of retries
  if out:
    paths.check_reachable(out)
  if not paths.isdir(workdir):
    raise ConfigError(f"{workdir}: workdir not found")
  from medvl_jax.ckpt import run_dir  # pylint: disable=g-import-not-at-top

  cfg = task_config(run_dir.load_run_config(workdir), task, list(overrides))
  evaluate.check_settings(task, cfg, key="--task/--cfg")  # Before any checkpoint is restored.
  # Where the result goes must be writable before the checkpoint is restored and evaluated.
  _check_writable(paths.parent(out) if out else paths.join(workdir, "eval"))
  config, encoders, state, step = load_run(workdir, step)
  evaluator = build_evaluator(encoders, task, cfg)  # Reads and checks its inputs.
  values = {name: value for name, value in evaluator.run(state)}
  result = {"task": task, "step": int(step), "workdir": workdir, "cfg": cfg, "metrics": values}
  out = out or paths.join(workdir, "eval", f"{task}-step{step}")
  try:
    with paths.output_dir(out, METRICS, _check_replaceable) as local:
      result["plots"] = evaluator.write_plots(pathlib.Path(local))
      text = json.dumps(result, indent=2, default=str) + "\n"
      pathlib.Path(local, METRICS).write_text(text)
  except OSError as e:
    if isinstance(e, MedvlError):  # an unreachable bucket says so itself
      raise
    raise OutputError(f"{out}: cannot write the evaluation ({e.strerror or e})") from e
  return out, result


def _check_writable(directory: str) -> None:
  """OutputError (exit 2) unless `directory` can be created and written (a probe file)."""
  try:
    paths.check_writable(directory)
  except OSError as e:
    if isinstance(e, MedvlError):
      raise
    raise OutputError(
      f"{directory}: cannot write the evaluation there ({e.strerror or e}); "
      "pass --out=DIR on a writable disk"
    ) from e


def read_evaluations(dirs: list[str]) -> list[dict[str, Any]]:
  """The metrics.json dicts of evaluation output directories."""
  runs = []
  for d in dirs:
    path = paths.join(d, METRICS)
    if not paths.isfile(path):
      raise ConfigError(f"{path}: not found (an output directory of this command expected)")
    try:
      runs.append(json.loads(paths.read_text(path)))
    except ValueError as e:
      raise ConfigError(f"{path}: cannot parse: {e}") from e
  return runs


def _metric_names(runs: list[dict[str, Any]]) -> list[str]:
  names = []
  for r in runs:
    names += [n for n in r["metrics"] if n not in names and not n.endswith(("_ci_lo", "_ci_hi"))]
  return names


def _run_labels(runs: list[dict[str, Any]]) -> list[str]:
  return [f"{paths.name(r['workdir'])} @ {r['step']}" for r in runs]


def compare_table(dirs: list[str]) -> str:
  """Markdown table: one row per metric, one column per evaluation directory."""
  runs = read_evaluations(dirs)
  head = ["metric"] + _run_labels(runs)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for n in _metric_names(runs):
    cells = [n]
    for r in runs:
      m = r["metrics"]
      v = m.get(n)
      if v is None:
        cells.append("n/a")
        continue
      cell = f"{v:.3f}"
      if m.get(f"{n}_ci_lo") is not None:
        cell += f" [{m[f'{n}_ci_lo']:.3f}, {m[f'{n}_ci_hi']:.3f}]"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def compare_chart(dirs: list[str], path: pathlib.Path) -> list[pathlib.Path]:
  """PNGs: one bar chart per metric across the evaluation directories (CIs as error bars) at
  `path`, and the runs' training and validation loss curves at `<path stem>_losses.png` when
  their workdirs hold TensorBoard logs. Returns the files written."""
  from medvl_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

  runs = read_evaluations(dirs)
  plots.comparison_chart(path, runs, _metric_names(runs), _run_labels(runs))
  curves = {}
  for label, r in zip(_run_labels(runs), runs):
    per_run = training_curves(paths.join(r["workdir"], "tensorboard"))
    if per_run:
      curves[label if label not in curves else f"{label} ({len(curves) + 1})"] = per_run
  if not curves:
    return [path]
  losses = path.with_name(f"{path.stem}_losses.png")
  plots.training_curves(losses, curves)
  return [path, losses]


LOSS_TAGS = ("train_loss", "val_loss")


def training_curves(
  logdir: str | pathlib.Path, tags: Sequence[str] = LOSS_TAGS
) -> dict[str, tuple[list, list]]:
  """{tag: (steps, values)} of the scalars `tags` (default: the losses; a tag ending in '*'
  matches every tag with that prefix) in a run's TensorBoard logs (a resumed run's later
  values replace the earlier ones); {} if there are none."""
  exact = {t for t in tags if not t.endswith("*")}
  prefixes = tuple(t[:-1] for t in tags if t.endswith("*"))
  files = [
    paths.join(logdir, *rel.split("/"))
    for rel in paths.files(logdir)
    if paths.name(rel).startswith("events.out.tfevents.")
  ]
  if not files:
    return {}
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out: dict[str, dict[int, float]] = {}
  with tempfile.TemporaryDirectory(prefix="medvl-events-") as local:
    for i, f in enumerate(sorted(files, key=paths.mtime)):
      if paths.is_url(f):  # TensorFlow's own GCS client has no endpoint setting: a local copy
        paths.copy(f, pathlib.Path(local, str(i)))
        f = str(pathlib.Path(local, str(i)))
      for rec in tf.data.TFRecordDataset(f):
        event = tf.compat.v1.Event.FromString(rec.numpy())
        for v in event.summary.value:
          wanted = v.tag in exact or (prefixes and v.tag.startswith(prefixes))
          if wanted and v.HasField("tensor"):
            out.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return {tag: (sorted(d), [d[s] for s in sorted(d)]) for tag, d in out.items()}
