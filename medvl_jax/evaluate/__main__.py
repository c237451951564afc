r"""Evaluate a training run's checkpoint on a downstream task, or compare evaluations.

  python -m medvl_jax.evaluate --workdir=runs/convirt --task=retrieval [--step=N] [--out=DIR] \
      [--cfg=chexpert_dir=/data/chexpert --cfg=n_boot=200]
  python -m medvl_jax.evaluate --compare DIR1 DIR2 [...] [--out=FILE.md]   # + FILE.png chart

Writes OUT/metrics.json ({'task', 'step', 'workdir', 'cfg', 'metrics'}) and the task's PNGs;
OUT defaults to WORKDIR/eval/<task>-step<N>. WORKDIR and OUT may be gs:// URLs. A local OUT is
written into a sibling temporary directory renamed into place when complete, so it never holds
a partial result; a gs:// OUT gets metrics.json last, and a folder without it is incomplete.
Task settings: the run's `config.evaluators` entry of that name (if any), then each
`--cfg key=value` (Python literal or string). Errors: one line `error: ...` on stderr, exit
status 2.
"""

# First, before anything can touch a URL: it maps STORAGE_EMULATOR_HOST to each storage
# library's own setting, which the libraries read once.
from medvl_jax import paths  # isort: split

import pathlib
import tempfile

from absl import app, flags, logging

from medvl_jax import cli
from medvl_jax.errors import ConfigError, MedvlError
from medvl_jax.evaluate import runs


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints/).")
  flags.DEFINE_string("task", None, "Evaluation task (see medvl_jax.evaluate.EVALUATORS).")
  flags.DEFINE_string(
    "step",
    None,
    "Checkpoint step: a number, or 'best' (lowest validation loss); default: the latest.",
  )
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
  cli.set_up_process(logging.ERROR)
  try:
    if fl.compare:
      if len(argv) < 2:
        raise ConfigError("--compare needs at least one evaluation directory")
      table = runs.compare_table(argv[1:])
      if fl.out:  # atomic: a reader never sees half a table; the chart beside it (.png)
        _write_comparison(argv[1:], table, fl.out)
      print(table, end="")
      return
    if len(argv) > 1:
      raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not fl.workdir or not fl.task:
      raise ConfigError("--workdir and --task are required (or --compare DIR ...)")
    from medvl_jax.ckpt import checkpoint  # pylint: disable=g-import-not-at-top  (after set-up)

    step = checkpoint.resolve_step(fl.workdir, fl.step)
    out, result = runs.evaluate_run(fl.workdir, fl.task, step, fl.out, fl.cfg)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))
  for name, value in result["metrics"].items():
    if not name.endswith(("_ci_lo", "_ci_hi")):
      print(f"{name}: {value}")
  print(f"wrote {paths.join(out, runs.METRICS)}")


def _write_comparison(dirs: list[str], table: str, out: str) -> None:
  """The table at `out` (written last, atomically) and the charts beside it (OUT's stem .png,
  _losses.png), drawn locally and copied there (`out` may be a URL)."""
  out = paths.absolute(out)
  stem = out[: -len(pathlib.PurePosixPath(out).suffix) or None]
  if f"{stem}.png" == out:
    raise ConfigError(f"--out={out}: the Markdown table's file, not a .png, expected")
  paths.check_reachable(out)
  paths.mkdir(paths.parent(out))
  with tempfile.TemporaryDirectory(prefix="medvl-compare-") as local:
    for chart in runs.compare_chart(dirs, pathlib.Path(local, f"{paths.name(stem)}.png")):
      paths.copy(chart, paths.join(paths.parent(out), chart.name))
  paths.write_text(out, table)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
