r"""The study in one command: does training learn here, does pretraining help, and does
unpaired data add?

  python -m experiments.study --out=/path/study            # the study: small size, 3 seeds
  python -m experiments.study --out=/path/study --quick    # CI-sized check (slow tests)
  python -m experiments.study --out=/path/study --size=full   # full-size models (GPU/TPU)
  python -m experiments.study --out=/path/study --check=b:0   # rerun one arm and seed, compare
  python -m experiments.study --out=/path/study --publish  # RESULTS.md + plots into docs/

Arms (the same seeds and the same evaluations for all; text towers start from the bundled
MiniLM checkpoint, image towers from random initialisation):
  a_resnet, a_vit  (a) no pretraining: each image architecture at its initialisation (per seed:
                   the very initialisation the trained arms of that seed start from)
  b                ConVIRT on the paired `covid_cxr_notes` training patients
  c                the mixed model on paired only
  d                the mixed model on paired + NIH pretraining-half images + Open-i reports
  e                the mixed model on NIH pretraining-half images + Open-i reports only
Sizes: `small` (default; the configs' `small` variants, 2,000 steps each, seeds 0, 1, 2; about
3-4 h on 2 CPU cores, docs/study.md), `full` (the configs' full size at their own short
length), `--quick` (the `smoke` size, 4 steps, seeds 0 and 1: a few minutes).

Resumable: OUT/arms/<arm>/seed<k>/state.json (written atomically) records each finished stage
(training, and each evaluation: nih, covid, retrieval, heldout, regeneration); a finished stage
is never redone, an interrupted training resumes from its last checkpoint. The report
(bootstrap CIs, paired differences pooled over seeds, learning curves, OUT/study_metrics.json,
OUT/RESULTS.md, OUT/plots/) is recomputed from the saved per-row scores at the end of every
invocation. TensorBoard: OUT/runs/<arm>/seed<k>/tensorboard. Errors: one line `error: ...` on
stderr, exit status 2.

Modules: experiments/design.py (arms, seeds, comparisons, settings, each arm's config),
evaluations.py (per-row scores of each evaluation), outputs.py (files under OUT, progress
lines), report.py (CIs, pooled paired differences, curves, plots), results.py (RESULTS.md),
this file (running the stages).
"""

import json
import os
import pathlib
import shutil
import signal
import time

from absl import app, flags, logging
import numpy as np

from experiments import data, design, evaluations, outputs, report, results
from medvl_jax import cli
from medvl_jax.errors import MedvlError


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
  return f"{stage}:{design.ARMS[arm]['config']}"


def run_arm(
  arm: str, seed: int, out: pathlib.Path, mode: str, eta: Eta, todo: list[tuple[str, int, str]]
) -> None:
  """The stages of one arm at one seed not yet done in `out`."""
  run = design.run_name(arm, seed)
  st = outputs.ArmState(out, run)
  config = design.arm_config(arm, mode, out / "tfds", seed)
  workdir = out / "runs" / run
  encoders = state = None
  for stage in design.stages_of(arm):
    if st.done(stage):
      continue
    todo.remove((arm, seed, stage))
    outputs.log(f"{run} {design.ARMS[arm]['title']}: {stage} ...")
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
        raise design.StudyError(
          f"{run}: training stopped at step {reached or 0} of {config.total_steps}; "
          "run the same command again to resume"
        )
      # The checkpoint the evaluations read: the lowest validation loss (docs/study.md).
      info = dict(steps=int(config.total_steps), selected_step=evaluations.selected_step(workdir))
    else:
      if encoders is None:
        config, encoders, state = evaluations.encoders_and_state(arm, config, workdir)
      result = evaluations.EVALS[stage](encoders, state, config, design.SETTINGS[mode])
      outputs.save_npz(st.dir / f"{stage}.npz", **result)
      info = {}
    wall = time.perf_counter() - t0
    st.mark(stage, wall_s=wall, finished=outputs.now(), **info)
    eta.add(kind_of(arm, stage), wall)
    outputs.log(
      f"{run}: {stage} done in {results._duration(wall)}; {len(todo)} stage(s) left, "
      f"ETA {eta.remaining([kind_of(a, s) for a, _, s in todo])}"
    )


# ----------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  """Defined only when run as a script, so importing this module defines no global flags."""
  flags.DEFINE_string("out", None, "Study directory (resumed if it exists).")
  flags.DEFINE_enum("size", "small", ["small", "full"], "Model size and length of the study.")
  flags.DEFINE_bool("quick", False, "Tiny variants, 4 steps, 2 seeds (CI).")
  flags.DEFINE_string(
    "arms",
    ",".join(design.ARMS),
    f"Comma list of arms to run (default: all: {','.join(design.ARMS)}).",
  )
  flags.DEFINE_string(
    "check",
    "",
    "ARM:SEED: rerun that finished arm and seed from scratch in OUT/check/ and compare its "
    "saved scores with the study's, bit for bit.",
  )
  flags.DEFINE_bool("publish", False, "Copy OUT's results into docs/.")
  flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fl = flags.FLAGS
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text towers load from a local checkpoint
  cli.set_up_process(logging.INFO)  # training's progress and ETA lines
  out = pathlib.Path(fl.out).absolute()
  mode = "quick" if fl.quick else fl.size
  try:
    if fl.publish:
      report.publish(out, design.REPO / "docs")
      return
    if fl.check:
      check_rerun(out, mode, fl.check)
      return
    run_study(out, _command(fl.out, mode), mode, fl.arms)
  except (design.StudyError, MedvlError) as e:
    cli.die(str(e))


def _command(out_flag: str, mode: str) -> str:
  extra = {"quick": " --quick", "full": " --size=full", "small": ""}[mode]
  return f"python -m experiments.study --out={out_flag}{extra}"


def _open_study(out: pathlib.Path, mode: str) -> None:
  """OUT/study.json: the mode of the study in `out`; another mode is refused."""
  out.mkdir(parents=True, exist_ok=True)
  study_file = out / "study.json"
  if study_file.is_file():
    prev = json.loads(study_file.read_text())
    if prev["mode"] != mode:
      raise design.StudyError(
        f"{out}: holds a {prev['mode']!r} study; this command asks for {mode!r} (use another --out)"
      )
  else:
    outputs.write_json(study_file, {"mode": mode, "started": outputs.now()})


def run_study(out: pathlib.Path, command: str, mode: str, arms_flag: str) -> None:
  """Runs the stages not yet done in `out` (arm by arm, seed by seed), then the report."""
  arms = [a.strip() for a in arms_flag.split(",") if a.strip()]
  bad = [a for a in arms if a not in design.ARMS]
  if bad or not arms:
    raise design.StudyError(
      f"--arms: unknown arm {bad[0] if bad else ''!r}; valid: {', '.join(design.ARMS)}"
    )
  _open_study(out, mode)
  seeds = design.SETTINGS[mode]["seeds"]
  runs = [(a, k) for a in arms for k in seeds]
  todo = [
    (a, k, s)
    for a, k in runs
    for s in design.stages_of(a)
    if not outputs.ArmState(out, design.run_name(a, k)).done(s)
  ]
  outputs.log(
    f"{mode} study in {out}: {len(todo)} stage(s) to run over arms {', '.join(arms)}, "
    f"seeds {', '.join(map(str, seeds))}"
  )
  eta = Eta()
  for a, k in runs:
    for stage, v in outputs.ArmState(out, design.run_name(a, k)).data["stages"].items():
      eta.add(kind_of(a, stage), v["wall_s"])
  if any(design.needs_openi(a) for a, _, _ in todo):
    data.prepare_openi(out)
  for i, (a, k) in enumerate(runs, 1):
    outputs.log(f"run {i}/{len(runs)}: {design.run_name(a, k)}")
    run_arm(a, k, out, mode, eta, todo)
  report.report(out, mode, command, list(design.ARMS))


def check_rerun(out: pathlib.Path, mode: str, which: str) -> None:
  """Reruns one finished arm and seed from scratch in OUT/check and compares every saved score
  file with the study's, bit for bit (exit status 2 and the differing files if any differ)."""
  arm, _, seed = which.partition(":")
  if arm not in design.ARMS or not seed.isdigit():
    raise design.StudyError(f"--check={which!r}: expected ARM:SEED, e.g. b:0")
  run = design.run_name(arm, int(seed))
  ref = outputs.ArmState(out, run)
  if not all(ref.done(s) for s in design.stages_of(arm)):
    raise design.StudyError(f"--check={which}: {run} is not finished in {out}")
  check = out / "check"
  if check.exists():
    shutil.rmtree(check)
  _open_study(check, mode)
  # The data already prepared for the study, so the rerun reads the very same records.
  (check / "tfds").symlink_to(out / "tfds", target_is_directory=True)
  todo = [(arm, int(seed), s) for s in design.stages_of(arm)]
  run_arm(arm, int(seed), check, mode, Eta(), todo)
  differing = []
  for stage in design.stages_of(arm):
    if stage == "train":
      continue
    a = np.load(ref.dir / f"{stage}.npz")
    b = np.load(outputs.ArmState(check, run).dir / f"{stage}.npz")
    same = set(a.files) == set(b.files) and all(
      a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a.files
    )
    if not same:
      differing.append(f"{stage}.npz")
  if differing:
    raise design.StudyError(f"{run}: the rerun differs in {', '.join(differing)}")
  outputs.log(f"{run}: the rerun's saved scores equal the study's, bit for bit")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
