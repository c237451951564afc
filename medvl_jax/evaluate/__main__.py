r"""Evaluate a training run's checkpoint on a downstream task, or compare evaluations.

  python -m medvl_jax.evaluate --workdir=runs/convirt --task=retrieval [--step=N] [--out=DIR] \
      [--cfg=chexpert_dir=/data/chexpert --cfg=n_boot=200]
  python -m medvl_jax.evaluate --compare DIR1 DIR2 [...] [--out=FILE.md]   # + FILE.png chart

Writes OUT/metrics.json ({'task', 'step', 'workdir', 'cfg', 'metrics'}) and the task's PNGs;
OUT defaults to WORKDIR/eval/<task>-step<N>. OUT is written into a sibling temporary directory
renamed into place when complete, so it never holds a partial result. Task settings: the run's
`config.evaluators` entry of that name (if any), then each `--cfg key=value` (Python literal or
string). Errors: one line `error: ...` on stderr, exit status 2.
"""

import ast
import json
import os
import pathlib
import secrets
import shutil
import types
from typing import Any

from absl import app, flags, logging

from medvl_jax import cli
from medvl_jax.errors import ConfigError, MedvlError, OutputError


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


def load_run(workdir: pathlib.Path, step: int | None):
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


def _install(tmp: pathlib.Path, out: pathlib.Path) -> None:
  def check_replaceable(existing: pathlib.Path) -> None:
    if not (existing / "metrics.json").is_file():
      raise ConfigError(
        f"{existing}: exists, is not empty and holds no metrics.json; refusing to replace it"
      )

  cli.install_dir(tmp, out, check_replaceable)


def evaluate_run(
  workdir: str,
  task: str,
  step: int | None = None,
  out: str | None = None,
  overrides: list[str] = (),
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Runs `task` on checkpoint `step` (default: latest); returns (OUT, metrics.json's dict)."""
  from medvl_jax import evaluate  # pylint: disable=g-import-not-at-top

  evaluate.get(task)  # Unknown task: fail before loading anything.
  workdir = pathlib.Path(workdir).absolute()
  if not workdir.is_dir():
    raise ConfigError(f"{workdir}: workdir not found")
  from medvl_jax.ckpt import run_dir  # pylint: disable=g-import-not-at-top

  cfg = task_config(run_dir.load_run_config(workdir), task, list(overrides))
  evaluate.check_settings(task, cfg, key="--task/--cfg")  # Before any checkpoint is restored.
  # Where the result goes must be writable before the checkpoint is restored and evaluated.
  _check_writable(pathlib.Path(out).absolute().parent if out else workdir / "eval")
  config, encoders, state, step = load_run(workdir, step)
  evaluator = build_evaluator(encoders, task, cfg)  # Reads and checks its inputs.
  values = {name: value for name, value in evaluator.run(state)}
  result = {"task": task, "step": int(step), "workdir": str(workdir), "cfg": cfg, "metrics": values}
  out = pathlib.Path(out).absolute() if out else workdir / "eval" / f"{task}-step{step}"
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
  except OSError as e:
    raise OutputError(f"{out}: cannot write the evaluation ({e.strerror or e})") from e
  try:
    result["plots"] = evaluator.write_plots(tmp)
    (tmp / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _install(tmp, out)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise OutputError(f"{out}: cannot write the evaluation ({e.strerror or e})") from e
    raise
  return out, result


def _check_writable(directory: pathlib.Path) -> None:
  """OutputError (exit 2) unless `directory` can be created and written (a probe file)."""
  try:
    cli.probe_write(directory)
  except OSError as e:
    raise OutputError(
      f"{directory}: cannot write the evaluation there ({e.strerror or e}); "
      "pass --out=DIR on a writable disk"
    ) from e


def read_evaluations(dirs: list[str]) -> list[dict[str, Any]]:
  """The metrics.json dicts of evaluation output directories."""
  runs = []
  for d in dirs:
    path = pathlib.Path(d) / "metrics.json"
    if not path.is_file():
      raise ConfigError(f"{path}: not found (an output directory of this command expected)")
    try:
      runs.append(json.loads(path.read_text()))
    except ValueError as e:
      raise ConfigError(f"{path}: cannot parse: {e}") from e
  return runs


def _metric_names(runs: list[dict[str, Any]]) -> list[str]:
  names = []
  for r in runs:
    names += [n for n in r["metrics"] if n not in names and not n.endswith(("_ci_lo", "_ci_hi"))]
  return names


def _run_labels(runs: list[dict[str, Any]]) -> list[str]:
  return [f"{pathlib.Path(r['workdir']).name} @ {r['step']}" for r in runs]


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
    per_run = training_curves(pathlib.Path(r["workdir"]) / "tensorboard")
    if per_run:
      curves[label if label not in curves else f"{label} ({len(curves) + 1})"] = per_run
  if not curves:
    return [path]
  losses = path.with_name(f"{path.stem}_losses.png")
  plots.training_curves(losses, curves)
  return [path, losses]


LOSS_TAGS = ("train_loss", "val_loss")


def training_curves(logdir: pathlib.Path) -> dict[str, tuple[list, list]]:
  """{tag: (steps, values)} of the loss scalars in a run's TensorBoard logs (a resumed run's
  later values replace the earlier ones); {} if there are none."""
  if not logdir.is_dir():
    return {}
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out: dict[str, dict[int, float]] = {}
  for f in sorted(logdir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
    for rec in tf.data.TFRecordDataset(str(f)):
      event = tf.compat.v1.Event.FromString(rec.numpy())
      for v in event.summary.value:
        if v.tag in LOSS_TAGS and v.HasField("tensor"):
          out.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return {tag: (sorted(d), [d[s] for s in sorted(d)]) for tag, d in out.items()}


# ----------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints/).")
  flags.DEFINE_string("task", None, "Evaluation task (see medvl_jax.evaluate.EVALUATORS).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string(
    "out",
    None,
    "Output directory (default WORKDIR/eval/TASK-stepN); with "
    "--compare, a Markdown file (and beside it a bar chart per metric, .png, and the runs' "
    "loss curves, _losses.png).",
  )
  flags.DEFINE_multi_string("cfg", [], "Task setting key=value (repeatable).")
  flags.DEFINE_bool(
    "compare",
    False,
    "Compare the metrics.json of the evaluation directories "
    "given as arguments: print a Markdown table.",
  )


def main(argv: list[str]) -> None:
  fl = flags.FLAGS
  if not fl["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  cli.quiet_closed_loop_errors()  # no stray asyncio traceback after a failed restore
  try:
    if fl.compare:
      if len(argv) < 2:
        raise ConfigError("--compare needs at least one evaluation directory")
      table = compare_table(argv[1:])
      if fl.out:  # atomic: a reader never sees half a table; the chart beside it (.png)
        chart = pathlib.Path(fl.out).with_suffix(".png")
        if chart == pathlib.Path(fl.out):
          raise ConfigError(f"--out={fl.out}: the Markdown table's file, not a .png, expected")
        tmp = pathlib.Path(f"{fl.out}.tmp-{secrets.token_hex(4)}")
        try:
          tmp.write_text(table)
          compare_chart(argv[1:], chart)
          os.replace(tmp, fl.out)
        finally:
          tmp.unlink(missing_ok=True)
      print(table, end="")
      return
    if len(argv) > 1:
      raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not fl.workdir or not fl.task:
      raise ConfigError("--workdir and --task are required (or --compare DIR ...)")
    out, result = evaluate_run(fl.workdir, fl.task, fl.step, fl.out, fl.cfg)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))
  for name, value in result["metrics"].items():
    if not name.endswith(("_ci_lo", "_ci_hi")):
      print(f"{name}: {value}")
  print(f"wrote {out / 'metrics.json'}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
