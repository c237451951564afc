"""SIGTERM handling (`train/preemption.py`), with a real signal sent to this process."""

import logging
import os
import signal
import threading

import numpy as np
import pytest

from medvl_jax.ckpt import checkpoint
from medvl_jax.train import preemption


@pytest.fixture
def sigterm_restored():
  before = signal.getsignal(signal.SIGTERM)
  yield
  signal.signal(signal.SIGTERM, before)


def test_sigterm_requests_a_stop_instead_of_ending_the_process(sigterm_restored, caplog):
  p = preemption.Preemption()
  assert not p.requested
  with caplog.at_level(logging.WARNING, logger="absl"):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before kill() returns
  assert p.requested
  assert "SIGTERM received: checkpointing at the next step, then stopping." in caplog.messages


def test_outside_the_main_thread_no_handler_is_installed(sigterm_restored):
  before = signal.getsignal(signal.SIGTERM)
  made = []
  t = threading.Thread(target=lambda: made.append(preemption.Preemption()))
  t.start()
  t.join()
  assert not made[0].requested
  assert signal.getsignal(signal.SIGTERM) is before


def test_stop_during_setup_is_one_line_and_closes_the_manager(tmp_path, caplog):
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 1, {"w": np.ones(2, np.float32)}, {"batches_consumed": 1})
  with caplog.at_level(logging.WARNING, logger="absl"):
    assert preemption.stop_during_setup("data preparation", mngr) == {}
  assert [m for m in caplog.messages if "SIGTERM" in m] == [
    "SIGTERM received during data preparation: stopped before training; nothing new to save "
    "(rerun the command to resume)"
  ]
  assert checkpoint.latest_intact_step(tmp_path) == 1  # closing waited for the pending save
