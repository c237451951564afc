r"""Claim 0's held-out figures of one trained run at each checkpoint it kept: a diagnosis tool
(where along training a run was best), not part of the pre-specified study, which evaluates the
checkpoint of lowest validation loss only.

  python -m experiments.by_step --out=/path/study --run=b/seed0

Prints, per kept step: the mean held-out contrastive loss (each held-out pair against all
held-out pairs, training's lam and temperature) and text→image R@5, both on the test patients
that the study's claim 0 reads; the run's untrained initialisation is step 0.
"""

import pathlib

from absl import app, flags

from experiments import design, evaluations, outputs
from medvl_jax import cli


def _define_flags() -> None:
  flags.DEFINE_string("out", None, "Study directory holding the run.")
  flags.DEFINE_string("run", None, "ARM/seedK of a trained arm, e.g. b/seed0.")
  flags.DEFINE_enum(
    "size", "small", ["small", "full", "quick"], "The study's size (quick: a --quick study)."
  )
  flags.mark_flags_as_required(["out", "run"])


def held_out_figures(config, encoders, state) -> tuple[float, float]:
  h = evaluations.eval_heldout(encoders, state, config, {})
  r = evaluations.eval_retrieval(encoders, state, config, {})
  return float(h["contrastive_loss"].mean()), float(r["hits_5"].mean())


def main(argv) -> None:
  del argv
  cli.set_up_process()
  from medvl_jax.ckpt import checkpoint  # pylint: disable=g-import-not-at-top
  from medvl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import features, runs  # pylint: disable=g-import-not-at-top

  fl = flags.FLAGS
  out = pathlib.Path(fl.out)
  arm, _, seed = fl.run.partition("/seed")
  if arm not in design.ARMS or not design.ARMS[arm]["train"] or not seed.isdigit():
    cli.die(f"--run={fl.run!r}: expected a trained arm's ARM/seedK, e.g. b/seed0")
  workdir = out / "runs" / fl.run
  steps = checkpoint.committed_steps(workdir / "checkpoints") if workdir.is_dir() else []
  if not steps:
    cli.die(f"{workdir}: no checkpoint")
  config = design.arm_config(arm, fl.size, out / "tfds", int(seed))
  model, state = evaluations.untrained(config)
  encoders = features.Encoders(model, config, tokenizer_lib.from_config(config))
  rows = [(0, *held_out_figures(config, encoders, state))]
  for step in steps:
    config, encoders, state, _ = runs.load_run(workdir, step)
    rows.append((step, *held_out_figures(config, encoders, state)))
  outputs.log(f"{fl.run}: held-out figures by step (step 0 = its untrained initialisation)")
  print("step  held-out contrastive loss  t2i R@5")
  for step, loss, r5 in rows:
    print(f"{step:>4}  {loss:>25.4f}  {r5:>7.3f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
