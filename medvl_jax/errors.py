"""User-facing errors: each is reported by the CLIs as one line and a non-zero exit."""

# What str.splitlines() breaks at: shown escaped, so an error stays on one line whatever
# text it quotes (a path, config value or CSV cell holding a newline or carriage return).
_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(message: str) -> str:
  """`message` with its line breaks escaped (a trailing one dropped)."""
  message = message.rstrip("\n")
  return "".join(repr(c)[1:-1] if c in _BREAKS else c for c in message)


class MedvlError(Exception):
  """Base class for errors whose message alone tells the user what is wrong and where.

  Its text is always one line: a line break in anything it quotes (a file name from a CSV
  cell, a config value) is shown escaped, wherever the error is printed or logged."""

  def __str__(self) -> str:
    return one_line(super().__str__())


class ConfigError(MedvlError, ValueError):
  """A config value is unknown, missing or inconsistent (names the key)."""


class DataError(MedvlError):
  """Input data is missing or malformed (names the file or directory)."""


class WeightsError(MedvlError):
  """A checkpoint to import/export is missing or does not match the model (names what)."""


class CheckpointError(MedvlError):
  """A training run cannot be read: no config.json, no checkpoint (at a step), or one that
  does not fit the model built from the run's config (names the directory and step)."""


class NonFiniteError(MedvlError):
  """Training met a non-finite loss, gradient or validation loss and stopped per
  `config.nonfinite` (names the step and the last good checkpoint)."""


class StorageError(MedvlError, OSError):
  """A path or URL cannot be used: unsupported scheme, bucket missing, endpoint unreachable
  (names the URL, and for a bucket the endpoint asked)."""


class LeaseError(MedvlError):
  """The workdir is held by another live run, or this run no longer holds it (names the
  holder)."""


class OutputError(MedvlError):
  """A directory or file cannot be created or written: a workdir that is a file or read-only,
  a disk without room for the run's checkpoints, an evaluation output (names the path)."""
