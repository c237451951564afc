"""What each step is due to do (`train/schedule.py`)."""

from configs import convirt
from medvl_jax.train import schedule


def _due(sched, steps, stop_at=()):
  out = {}
  for s in steps:
    d = sched.at(s, s in stop_at)
    out[s] = "".join(c for c, on in zip("lec", (d.log, d.evaluate, d.checkpoint)) if on)
  return out


def test_a_fresh_run():
  sched = schedule.Schedule(log_every=2, eval_every=5, checkpoint_every=4, total_steps=11)
  assert _due(sched, range(1, 12)) == {
    1: "l",  # the first step of a run always logs
    2: "l",
    3: "",
    4: "lc",
    5: "e",
    6: "l",
    7: "",
    8: "lc",
    9: "",
    10: "le",
    11: "lec",  # the last step does everything
  }


def test_a_resumed_run_and_a_preemption():
  sched = schedule.Schedule(
    log_every=10, eval_every=10, checkpoint_every=10, total_steps=30, start_step=13
  )
  assert _due(sched, range(14, 21), stop_at={17}) == {
    14: "l",  # the first step after the resumption
    15: "",
    16: "",
    17: "c",  # the run stops after this step: checkpoint
    18: "",
    19: "",
    20: "lec",
  }


def test_waits_for_devices_at_evaluation_and_checkpoint_only():
  assert schedule.Due(log=False, evaluate=True, checkpoint=False).waits_for_devices
  assert schedule.Due(log=False, evaluate=False, checkpoint=True).waits_for_devices
  assert not schedule.Due(log=True, evaluate=False, checkpoint=False).waits_for_devices


def test_from_config():
  cfg = convirt.get_config("smoke")
  sched = schedule.Schedule.from_config(cfg, start_step=3)
  assert sched == schedule.Schedule(
    log_every=cfg.log_every,
    eval_every=cfg.eval_every,
    checkpoint_every=cfg.checkpoint_every,
    total_steps=cfg.total_steps,
    start_step=3,
  )
