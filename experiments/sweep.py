r"""The short learning-rate sweep behind the `small` size's learning rates (docs/study.md).

  python -m experiments.sweep --out=/path/sweep [--steps=300]

On the training split only (no validation or test patient is read): each family's `small`
config on the paired training pairs, at each learning rate of LRS, for `--steps` steps; the
figure of merit is the mean training loss over the last third of the steps (lower is better;
a run that stops on non-finite values is out). The batch is not swept: 16 is what the 2-core
budget allows at 2,000 steps per arm (docs/study.md). Resumable (a finished run is read back);
writes OUT/sweep.json and prints one table.
"""

import os
import pathlib

from absl import app, flags, logging
import numpy as np

from experiments import design, outputs
from medvl_jax import cli
from medvl_jax.errors import MedvlError

LRS = (1e-4, 3e-4, 1e-3)
FAMILIES = ("convirt", "mixed")


def run(out: pathlib.Path, steps: int, families=FAMILIES, text_mode: str = "") -> dict:
  from medvl_jax.ckpt import checkpoint  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import runs  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import loop  # pylint: disable=g-import-not-at-top

  table = {}
  for family in families:
    for lr in LRS:
      name = f"{family}_lr{lr:g}" + (f"_{text_mode}" if text_mode else "")
      workdir = out / name
      c = design._config_module(family).get_config("small")  # pylint: disable=protected-access
      c.data.sources = (dict(design.PAIRED, weight=1.0),)
      c.data.data_dir = str(out / "tfds")
      c.optimizer.lr = lr
      if text_mode:
        c.data.text_mode = text_mode
      c.total_steps = steps
      c.log_every = 10
      # The trainer validates once at its last step; that figure is logged, never used here.
      c.eval_every = c.checkpoint_every = steps
      c.evaluators = []
      status = "finished"
      if (checkpoint.latest_intact_step(workdir) or 0) < steps:
        outputs.log(f"sweep: {name} ...")
        try:
          loop.train_and_evaluate(c, str(workdir))
        except MedvlError as e:  # a diverged run (non-finite) is a result, not a failure
          status = f"stopped: {str(e).splitlines()[0][:80]}"
      curve = runs.training_curves(workdir / "tensorboard", ("train_loss",)).get("train_loss")
      tail = [v for s, v in zip(*curve) if s > steps * 2 // 3] if curve else []
      table[name] = dict(
        family=family,
        lr=lr,
        text_mode=str(c.data.text_mode),
        steps=steps,
        status=status,
        last_third_train_loss=float(np.mean(tail)) if tail and status == "finished" else None,
      )
  best = {}
  for family in families:
    rows = [r for r in table.values() if r["family"] == family and r["last_third_train_loss"]]
    if rows:
      best[family] = min(rows, key=lambda r: r["last_third_train_loss"])["lr"]
  result = {"steps": steps, "lrs": list(LRS), "runs": table, "best_lr": best}
  outputs.write_json(out / "sweep.json", result)
  print("| family | text | lr | mean train loss, last third | status |\n|---|---|---|---|---|")
  for r in table.values():
    loss = r["last_third_train_loss"]
    print(
      f"| {r['family']} | {r['text_mode']} | {r['lr']:g} |"
      f" {'n/a' if loss is None else f'{loss:.4f}'} | {r['status']} |"
    )
  print(f"best: {best}")
  return result


def _define_flags() -> None:
  flags.DEFINE_string("out", None, "Sweep directory (resumed if it exists).")
  flags.DEFINE_integer("steps", 300, "Steps per run.")
  flags.DEFINE_list("families", list(FAMILIES), "Families to sweep.")
  flags.DEFINE_enum(
    "text_mode", "", ["", "sentence", "report"], "data.text_mode ('' = the small config's)."
  )
  flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  cli.set_up_process(logging.INFO)
  out = pathlib.Path(flags.FLAGS.out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  try:
    fl = flags.FLAGS
    bad = [f for f in fl.families if f not in FAMILIES]
    if bad:
      raise MedvlError(f"--families: unknown {bad[0]!r}; valid: {', '.join(FAMILIES)}")
    run(out, fl.steps, tuple(fl.families), fl.text_mode)
  except MedvlError as e:
    cli.die(str(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
