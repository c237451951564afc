"""Which steps log, evaluate and checkpoint (`config.log_every`, `eval_every`,
`checkpoint_every`, `total_steps`)."""

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Due:
  """What happens at one step, after its update."""

  log: bool
  evaluate: bool
  checkpoint: bool

  @property
  def waits_for_devices(self) -> bool:
    """Evaluation and checkpoint need the state final: every step so far is waited for."""
    return self.evaluate or self.checkpoint


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The progress line at every `log_every`-th step, the first step of a run (or of its
  resumption) and the last; evaluation at every `eval_every`-th step and the last; a
  checkpoint at every `checkpoint_every`-th step, the last, and a step the run stops at."""

  log_every: int
  eval_every: int
  checkpoint_every: int
  total_steps: int
  start_step: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, start_step: int) -> "Schedule":
    return cls(
      log_every=config.log_every,
      eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every,
      total_steps=config.total_steps,
      start_step=start_step,
    )

  def at(self, step: int, stop: bool = False) -> Due:
    """What is due at `step`; `stop`: the run stops after it (preemption)."""
    last = step == self.total_steps
    return Due(
      log=step % self.log_every == 0 or last or step == self.start_step + 1,
      evaluate=step % self.eval_every == 0 or last,
      checkpoint=step % self.checkpoint_every == 0 or last or stop,
    )
