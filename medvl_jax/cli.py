"""What every command-line tool here shares: mistakes end as one `error: ...` line, exit 2;
an output directory appears complete or not at all."""

from collections.abc import Callable
import logging
import os
import pathlib
import secrets
import shutil
import sys
from typing import Any, NoReturn

from absl import flags

from medvl_jax.errors import one_line


def die(message: str) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(2)


def last_line(e: BaseException) -> str:
  """Some libraries (ml_collections) embed tracebacks in messages; the last line says what."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`: one line on a bad flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    die(last_line(e))


def _closed_loop_noise(exc_type: Any, exc: Any) -> bool:
  """RuntimeError('Event loop is closed') from asyncio: a TensorStore read or write that
  completes after Orbax closed the event loop of a failed save or restore. Harmless; the
  failure itself is already reported in one line."""
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def quiet_closed_loop_errors() -> None:
  """Drops the stray 'Event loop is closed' tracebacks (printed through sys.excepthook or
  sys.unraisablehook from TensorStore callback threads) and the unraisable exceptions of
  Orbax's abandoned coroutines that follow a failed Orbax save or restore; every other
  exception is printed as before."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def on_exception(exc_type, exc, tb):
    if not _closed_loop_noise(exc_type, exc):
      excepthook(exc_type, exc, tb)

  def on_unraisable(unraisable):
    # Also: "Exception ignored in: <coroutine ...>" of Orbax's other read/write coroutines,
    # garbage-collected after the first one failed (timing-dependent); the failure itself is
    # reported by medvl_jax in one line (a damaged step, a failed save).
    code = getattr(unraisable.object, "cr_code", None)
    orbax_coroutine = code is not None and "/orbax/" in code.co_filename.replace("\\", "/")
    if not (orbax_coroutine or _closed_loop_noise(unraisable.exc_type, unraisable.exc_value)):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
  # And asyncio's "Task exception was never retrieved" for the write/read tasks of the same
  # failed Orbax save or restore (logged by the event loop when the task is collected, possibly
  # after our one error line).
  logging.getLogger("asyncio").addFilter(_orbax_task_noise)


def _orbax_task_noise(record: logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of an unretrieved exception ("Task exception was never
  retrieved", "_GatheringFuture exception was never retrieved") raised in Orbax's code, or
  ("Future exception was never retrieved") by the TensorStore write or read of an Orbax
  checkpoint's OCDBT database: the other chunk writes of a save that failed on a full disk,
  collected after our one error line."""
  message = str(record.msg)
  if "exception was never retrieved" not in message.partition("\n")[0]:
    return True
  if "/orbax/" in message or "in OCDBT database at" in message:
    return False
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if "/orbax/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
      return False
    tb = tb.tb_next
  return True


def probe_write(directory: pathlib.Path) -> None:
  """Creates `directory` if needed and writes and removes a probe file in it: raises OSError
  when it cannot (permission bits alone do not tell: root passes them on a read-only mount)."""
  directory.mkdir(parents=True, exist_ok=True)
  probe = directory / f".write-probe-{secrets.token_hex(4)}"
  probe.write_bytes(b"")
  probe.unlink()


def install_dir(
  tmp: pathlib.Path, out: pathlib.Path, check_replaceable: Callable[[pathlib.Path], None]
) -> None:
  """Renames the complete directory `tmp` (a sibling of `out`) to `out`.

  A missing or empty `out` is replaced at once. A non-empty one is first passed to
  `check_replaceable`, which raises when it must stay (e.g. it is not an earlier output of
  the same tool); it is then set aside, and removed only once `tmp` is in its place (put back
  if that rename fails), so `out` always holds the previous content or the new one.
  """
  if not (out.exists() and any(out.iterdir())):
    os.replace(tmp, out)  # Also replaces an empty directory at `out`, atomically.
    return
  check_replaceable(out)
  old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except OSError:
    os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def warn(message: str) -> None:
  """One `warning: ...` line on stderr, whatever the log verbosity: something the user of a
  command must know that does not stop it (e.g. a damaged checkpoint passed over)."""
  print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)
