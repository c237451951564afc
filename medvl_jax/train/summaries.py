"""The run's TensorBoard event files, in `<workdir>/tensorboard/`, a local path or a URL.

clu's writer (TensorFlow's event writer) needs a local directory: TensorFlow's own GCS client
has no endpoint setting, so it could not be tested against an emulator, and a GCS object cannot
be appended to anyway. So the chief writes under a `paths.Mirror` of the directory: for a
local workdir the directory itself; for a URL a local staging directory whose changed files
are uploaded at each `flush` (the loop flushes at each checkpoint of a run in a bucket, so the
logs reach the bucket with the checkpoints) and at `close`. An upload replaces the whole event
file: a few MB for a long run's scalars. The other processes of a multi-host run only log.
"""

from typing import Any

from clu import metric_writers

from medvl_jax import paths


class Summaries:
  """clu's default writer on `<workdir>/tensorboard` (chief) or logging only (other hosts)."""

  def __init__(self, workdir: str, is_chief: bool):
    self._mirror = paths.Mirror(paths.join(workdir, "tensorboard")) if is_chief else None
    self._writer = metric_writers.create_default_writer(
      self._mirror.local if is_chief else None, just_logging=not is_chief, asynchronous=True
    )

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    self._writer.write_scalars(step, scalars)

  def write_hparams(self, hparams: dict[str, Any]) -> None:
    self._writer.write_hparams(hparams)

  def flush(self) -> None:
    """Writes what is pending to the event files; for a URL workdir, uploads those changed."""
    self._writer.flush()
    if self._mirror is not None:
      self._mirror.sync()

  def close(self) -> None:
    self._writer.close()
    if self._mirror is not None:
      self._mirror.close()
