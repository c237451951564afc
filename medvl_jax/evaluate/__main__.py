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

import os
import pathlib
import secrets

from absl import app, flags, logging

from medvl_jax import cli
from medvl_jax.errors import ConfigError, MedvlError
from medvl_jax.evaluate import runs


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
  cli.set_up_process(logging.ERROR)
  try:
    if fl.compare:
      if len(argv) < 2:
        raise ConfigError("--compare needs at least one evaluation directory")
      table = runs.compare_table(argv[1:])
      if fl.out:  # atomic: a reader never sees half a table; the chart beside it (.png)
        chart = pathlib.Path(fl.out).with_suffix(".png")
        if chart == pathlib.Path(fl.out):
          raise ConfigError(f"--out={fl.out}: the Markdown table's file, not a .png, expected")
        tmp = pathlib.Path(f"{fl.out}.tmp-{secrets.token_hex(4)}")
        try:
          tmp.write_text(table)
          runs.compare_chart(argv[1:], chart)
          os.replace(tmp, fl.out)
        finally:
          tmp.unlink(missing_ok=True)
      print(table, end="")
      return
    if len(argv) > 1:
      raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not fl.workdir or not fl.task:
      raise ConfigError("--workdir and --task are required (or --compare DIR ...)")
    out, result = runs.evaluate_run(fl.workdir, fl.task, fl.step, fl.out, fl.cfg)
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
