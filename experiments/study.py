r"""The study in one command: does pretraining help here, and does unpaired data add?

  JAX_PLATFORMS=cpu python -m experiments.study --out=/path/study          # default length
  JAX_PLATFORMS=cpu python -m experiments.study --out=/path/study --quick  # CI-sized check
  python -m experiments.study --out=/path/study --publish   # RESULTS.md + plots into docs/

Arms (the same seed and the same evaluations for all; text towers start from the bundled
MiniLM checkpoint, image towers from random initialisation):
  a_resnet, a_vit  (a) no pretraining: the ResNet-50 and the ViT-B/16 at their random init
  b                ConVIRT on the paired `covid_cxr_notes` training patients (configs/convirt.py)
  c                the mixed model on paired only            (configs/mixed.py:paired_only)
  d                the mixed model on paired + NIH images + IU reports  (configs/mixed.py)
  e                the mixed model on NIH images + IU reports only      (configs/mixed.py:unpaired)
Each pretrained arm is compared with the (a) arm of its own image architecture, and (d) with
(c). Default length: the configs' own (ConVIRT 48 steps at batch 32, mixed 32 steps at batch
16; about 15 min per arm on 2 free CPU cores, about 1.5 h for the whole study with its
evaluations); `--quick`: the configs' tiny `smoke` variants (MiniLM text tower kept) for 4
steps, fewer folds and resamples (a few minutes).

Resumable: OUT/arms/<arm>/state.json (written atomically) records each finished stage
(training, and each evaluation: nih, covid, retrieval, regeneration); a finished stage is never
redone, an interrupted training resumes from its last checkpoint. The report (bootstrap CIs,
paired differences, OUT/study_metrics.json, OUT/RESULTS.md, OUT/plots/) is recomputed from the
saved per-row scores at the end of every invocation. TensorBoard: OUT/runs/<arm>/tensorboard.
Errors: one line `error: ...` on stderr, exit status 2.

Modules: experiments/design.py (arms, comparisons, settings, each arm's config), evaluations.py
(per-row scores of each evaluation), outputs.py (files under OUT, progress lines), report.py
(CIs, paired differences, plots, RESULTS.md via results.py), this file (running the stages).
"""

import json
import os
import pathlib
import signal
import time

from absl import app, flags, logging
import numpy as np

from experiments import design, evaluations, outputs, report, results
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


def run_arm(arm: str, out: pathlib.Path, mode: str, eta: Eta, todo: list[tuple[str, str]]) -> None:
  st = outputs.ArmState(out, arm)
  config = design.arm_config(arm, mode, out / "tfds")
  workdir = out / "runs" / arm
  encoders = state = None
  for stage in design.stages_of(arm):
    if st.done(stage):
      continue
    todo.remove((arm, stage))
    outputs.log(f"arm {arm} {design.ARMS[arm]['title']}: {stage} ...")
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
          f"arm {arm}: training stopped at step {reached or 0} of {config.total_steps}; "
          "run the same command again to resume"
        )
      info = dict(steps=int(config.total_steps))
    else:
      if encoders is None:
        config, encoders, state = evaluations.encoders_and_state(arm, config, workdir)
      result = evaluations.EVALS[stage](encoders, state, config, design.SETTINGS[mode])
      if stage == "regeneration":
        outputs.write_json(st.dir / "regeneration.json", result)
      else:
        outputs.save_npz(st.dir / f"{stage}.npz", **result)
      info = {}
    wall = time.perf_counter() - t0
    st.mark(stage, wall_s=wall, finished=outputs.now(), **info)
    eta.add(kind_of(arm, stage), wall)
    outputs.log(
      f"arm {arm}: {stage} done in {results._duration(wall)}; "
      f"{len(todo)} stage(s) left, ETA {eta.remaining([kind_of(a, s) for a, s in todo])}"
    )


# ----------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  """Defined only when run as a script, so importing this module defines no global flags."""
  flags.DEFINE_string("out", None, "Study directory (resumed if it exists).")
  flags.DEFINE_bool("quick", False, "Tiny variants, 4 steps (CI).")
  flags.DEFINE_string(
    "arms",
    ",".join(design.ARMS),
    f"Comma list of arms to run (default: all: {','.join(design.ARMS)}).",
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
  try:
    if fl.publish:
      report.publish(out, design.REPO / "docs")
      return
    run_study(out, fl.out, fl.quick, fl.arms)
  except (design.StudyError, MedvlError) as e:
    cli.die(str(e))


def run_study(out: pathlib.Path, out_flag: str, quick: bool, arms_flag: str) -> None:
  """Runs the arms' stages not yet done in `out`, then the report."""
  mode = "quick" if quick else "full"
  arms = [a.strip() for a in arms_flag.split(",") if a.strip()]
  bad = [a for a in arms if a not in design.ARMS]
  if bad or not arms:
    raise design.StudyError(
      f"--arms: unknown arm {bad[0] if bad else ''!r}; valid: {', '.join(design.ARMS)}"
    )
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
  command = f"JAX_PLATFORMS=cpu python -m experiments.study --out={out_flag}" + (
    " --quick" if quick else ""
  )
  todo = [(a, s) for a in arms for s in design.stages_of(a) if not outputs.ArmState(out, a).done(s)]
  outputs.log(f"{mode} study in {out}: {len(todo)} stage(s) to run over arms {', '.join(arms)}")
  eta = Eta()
  for a in arms:
    for stage, v in outputs.ArmState(out, a).data["stages"].items():
      eta.add(kind_of(a, stage), v["wall_s"])
  for i, a in enumerate(arms, 1):
    outputs.log(f"arm {i}/{len(arms)}: {a}")
    run_arm(a, out, mode, eta, todo)
  report.report(out, mode, command, list(design.ARMS))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
