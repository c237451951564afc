"""Test-only entry point: the real CLI (medvl_jax.main) with resume broken on purpose.

tests/end_to_end/test_faults.py restarts killed runs through this module to check that the
kill/restart harness notices a broken resume. The product code is untouched; the breakage is a
monkeypatch applied here, chosen by FAULTS_BREAK_RESUME:

  data_from_start  the input iterator ignores the checkpoint's data position and replays the
                   data from batch 0 (the state itself is restored correctly);
  position_off_by_one  the restored data position is one batch short, so one batch is trained
                   twice (as an off-by-one in the resume bookkeeping would).

  python -m tests.faults_broken_resume --config=configs/convirt.py:smoke ...
"""

import os

from absl import app, logging

from medvl_jax import cli
from medvl_jax import main as cli_main
from medvl_jax.ckpt import checkpoint
from medvl_jax.data import streams

BREAKS = ("data_from_start", "position_off_by_one")


def _break(kind: str) -> None:
  if kind == "data_from_start":
    original = streams.create_train_iterator

    def from_start(config, tokenizer, *, start_step=0, **kw):
      if start_step:
        logging.warning("FAULTS_BREAK_RESUME=%s applied (start_step %d -> 0)", kind, start_step)
      return original(config, tokenizer, start_step=0, **kw)

    streams.create_train_iterator = from_start
  elif kind == "position_off_by_one":
    # Patched at restore_newest_good (what the trainer calls): `restore` itself is checked
    # there (its data position must equal the step), which would turn this breakage into a
    # "damaged step" fallback instead of a broken resume.
    original = checkpoint.restore_newest_good

    def off_by_one(*args, **kw):
      out = original(*args, **kw)
      if out is None:
        return out
      step, state, data = out
      logging.warning("FAULTS_BREAK_RESUME=%s applied", kind)
      return step, state, dict(data, batches_consumed=data["batches_consumed"] - 1)

    checkpoint.restore_newest_good = off_by_one
  else:
    raise SystemExit(f"error: FAULTS_BREAK_RESUME={kind!r}; valid: {', '.join(BREAKS)}")


if __name__ == "__main__":
  _break(os.environ.get("FAULTS_BREAK_RESUME", ""))
  logging.set_verbosity(logging.INFO)
  app.run(cli_main.main, flags_parser=cli.parse_flags)
