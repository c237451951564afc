"""The 'saved checkpoint N (async, x.x s)' line (`train/save_log.py`) on a real Orbax manager."""

import logging
import re

import numpy as np

from medvl_jax.ckpt import checkpoint
from medvl_jax.train import save_log


def _saved_lines(caplog) -> list[str]:
  return [m for m in caplog.messages if m.startswith("saved checkpoint")]


def test_one_line_per_finalised_save(tmp_path, caplog):
  saves = save_log.SaveLog()
  mngr = checkpoint.manager(tmp_path, on_commit=saves.finalised)
  state = {"w": np.arange(1000, dtype=np.float32)}
  with caplog.at_level(logging.INFO, logger="absl"):
    saves.poll(mngr, wait=True)  # nothing saved yet: no line
    assert _saved_lines(caplog) == []
    for step in (1, 2):
      checkpoint.save(mngr, step, state, {"batches_consumed": step})
      saves.started(step)
      saves.poll(mngr, wait=True)
      saves.poll(mngr)  # logged once only
  mngr.close()
  steps = [
    re.fullmatch(r"saved checkpoint (\d+) \(async, \d+\.\d s\)", l) for l in _saved_lines(caplog)
  ]
  assert [int(m[1]) for m in steps] == [1, 2]


def test_poll_logs_a_finished_save_without_waiting(tmp_path, caplog):
  saves = save_log.SaveLog()
  mngr = checkpoint.manager(tmp_path, on_commit=saves.finalised)
  checkpoint.save(mngr, 5, {"w": np.ones(4, np.float32)}, {"batches_consumed": 5})
  saves.started(5)
  mngr.wait_until_finished()
  with caplog.at_level(logging.INFO, logger="absl"):
    saves.poll(mngr)
  mngr.close()
  assert len(_saved_lines(caplog)) == 1 and saves.pending is None
