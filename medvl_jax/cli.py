"""What every command-line tool here shares: the process set-up, one flag parser, and mistakes
that end as one `error: ...` line, exit 2. (Output directories that appear complete or not at
all: `medvl_jax.paths.output_dir`.)"""

import difflib
import logging
import os
import re
import sys
from typing import Any, NoReturn

from absl import flags
from absl import logging as absl_logging

from medvl_jax.errors import one_line


def die(message: str) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(2)


def last_line(e: BaseException) -> str:
  """Some libraries (ml_collections) embed tracebacks in messages; the last line says what."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


# ----------------------------------------------------------------------------- flags
# absl's help flags print the help and exit with status 1; asking for help is no failure.
_HELP_FLAGS = frozenset(
  f"{dash}{name}" for dash in ("-", "--") for name in ("help", "helpshort", "helpfull", "?")
)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`.

  A bad flag, a config file that does not load and an override of a config key that does not
  exist each end as one `error: ...` line, exit 2; `--help` (also `-h`) prints the help and
  exits 0.
  """
  end = argv.index("--") if "--" in argv else len(argv)
  argv = [("--help" if a == "-h" and i < end else a) for i, a in enumerate(argv)]
  try:
    rest = flags.FLAGS(argv)
    for flag in _config_flags():
      if flag.present:
        flag.value.to_dict()  # a failed load surfaces on first attribute access: do it here
    return rest
  except SystemExit as e:
    if e.code == 1 and _HELP_FLAGS.intersection(argv[1:end]):
      sys.exit(0)
    raise
  except flags.Error as e:
    die(last_line(e))
  except (AttributeError, KeyError, IndexError) as e:  # ml_collections: override of an absent key
    die(_absent_key_message(argv, e))
  except (OSError, ValueError, TypeError) as e:  # missing config file, bad value or variant
    die(f"--{_config_flag_name()}: {last_line(e)}")
  return []


def _config_flags() -> list[Any]:
  """The ml_collections config flags defined (main's --config)."""
  fv = flags.FLAGS
  return [fv[name] for name in fv if fv[name].parser.flag_type() == "config object"]


def _config_flag_name() -> str:
  found = _config_flags()
  return found[0].name if found else "config"


def _absent_key_message(argv: list[str], error: BaseException) -> str:
  """One line naming the override whose config key does not exist, with its full dotted key
  and the closest key that does (ml_collections names only the last part of the key)."""
  given = []
  for flag in _config_flags():
    overrides = [a for a in argv[1:] if re.match(rf"--?(no)?{re.escape(flag.name)}\.", a)]
    given += overrides
    config = _load_config(flag, argv)
    if config is None:
      continue
    for arg in overrides:
      path = arg.split("=", 1)[0].split(".", 1)[1]
      found = _absent_key(config, path)
      if found:
        key, close = found
        hint = f"; did you mean {close!r}?" if close else ""
        return f"config key {key!r} does not exist{hint} (overrides given: {' '.join(given)})"
  # Not located (the config file not found in argv): ml_collections' own words, first line.
  while isinstance(error, BaseException) and error.args:
    error = error.args[0]
  what = str(error).splitlines()[0].strip("\\'\" ") if str(error) else type(error).__name__
  return (
    f"config override of a key that does not exist: {what} (overrides given: {' '.join(given)})"
  )


def _load_config(flag: Any, argv: list[str]) -> Any:
  """The config that `flag` loads from its file argument in `argv`, without overrides; None
  when that cannot be had."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if re.match(rf"--?{re.escape(flag.name)}=", arg):
      value = arg.split("=", 1)[1]
    elif arg in (f"--{flag.name}", f"-{flag.name}") and i + 1 < len(argv):
      value = argv[i + 1]
  if value is None:
    return None
  try:
    config = flag.parser.parse(value)
    config.to_dict()
  except Exception:  # pylint: disable=broad-except  # the override's error is reported instead
    return None
  return config


def _absent_key(config: Any, path: str) -> tuple[str, str | None] | None:
  """(the first prefix of dotted `path` that is not a key of `config`, the closest existing
  key at that level or None); None when the whole path exists or cannot be judged. Parts may
  index a sequence: `data.sources[1].weight`."""
  node, done = config, ""
  for part in path.split("."):
    m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
    if not m:
      return None
    name, indices = m.group(1), [int(i) for i in re.findall(r"\d+", m.group(2))]
    keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    if name not in keys:
      close = difflib.get_close_matches(name, keys, n=1)
      return done + name, (done + close[0] if close else None)
    node, done = node[name], done + name
    for i in indices:
      if not isinstance(node, (list, tuple)) or i >= len(node):
        return f"{done}[{i}]", None
      node, done = node[i], f"{done}[{i}]"
    done += "."
  return None


# ----------------------------------------------------------------------------- process set-up
def set_up_process(default_verbosity: int = absl_logging.INFO) -> None:
  """What every CLI does once its flags are parsed, before any JAX work.

  Logs at `default_verbosity` (absl's levels) unless --verbosity is given; keeps the console
  to medvl_jax's own lines (library chatter at debug level, library warnings and errors kept,
  one line each); persists compiled programs across runs; spares a host without TPU chips
  JAX's libtpu start-up.
  """
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(default_verbosity)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  absl_logging.get_absl_handler().addFilter(_DEBUG_ONLY)
  # transformers logs through its own handler, not absl's: the filter sits on its logger,
  # which exists (and is this one) before transformers is imported.
  logging.getLogger("transformers").addFilter(_DEBUG_ONLY)
  quiet_closed_loop_errors()
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # tfds's progress bars while a run prepares the bundled sample or a random-access copy
  # (seconds; medvl_jax logs a line for each); `data_pipelines.prepare` shows them.
  tfds.disable_progress_bar()

  # Re-runs and resumes reuse compiled programs (compile of the full model: ~10 s on 2 cores).
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/medvl_jax/xla"))
  _leave_out_absent_tpu(jax)


class _QuietLibraries(logging.Filter):
  """Keeps the console readable: INFO chatter of Orbax/tfds/clu internals is dropped, and
  their warnings and errors stay one line each (no traceback: a failed save or restore is
  reported by medvl_jax itself, in one line naming the step and the cause)."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/clu/", "/etils/")

  def filter(self, record):
    if not any(n in record.pathname for n in self.NOISY):
      return True
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record.levelno >= logging.WARNING


_NO_TPU_CHIP = "this host has no TPU chip (libtpu not started; JAX_FORCE_TPU_INIT=1 starts it)"


class _DebugOnly(logging.Filter):
  """Library messages that tell nothing about this run: logged at DEBUG (shown with
  --verbosity=1), dropped otherwise."""

  MESSAGES = (
    # transformers, imported for its tokenizers on a machine without torch (the main job's
    # install has none; export installs it).
    re.compile(r"^PyTorch was not found\. Models won't be available"),
    # JAX, on a host without a TPU chip (see _leave_out_absent_tpu).
    re.compile(r"^Unable to initialize backend 'tpu': " + re.escape(_NO_TPU_CHIP)),
    # tfds, looking for a dataset that is not prepared yet (medvl_jax then prepares it and
    # logs that it does).
    re.compile(r"^Variant folder %s has no %s$"),
  )

  def filter(self, record):
    if not any(m.search(str(record.msg)) for m in self.MESSAGES):
      return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return absl_logging.get_verbosity() >= absl_logging.DEBUG


_DEBUG_ONLY = _DebugOnly()


def _leave_out_absent_tpu(jax: Any) -> None:
  """With libtpu installed, JAX starts libtpu also on a host without a TPU chip: libtpu writes
  its start-up failure (a dozen C++ log lines) straight to stderr, and JAX falls back to the
  next backend. Where JAX would try (no JAX_PLATFORMS, no JAX_FORCE_TPU_INIT) and this host has
  no TPU chip, JAX's TPU backend fails at once instead, without loading libtpu: the same
  outcome, and JAX's one line about it is logged at debug level. Compiling for a TPU slice
  (--compile_only) loads libtpu by itself."""
  if jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ:
    return
  try:
    from jax._src import hardware_utils, xla_bridge  # pylint: disable=g-import-not-at-top

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return
    registration = xla_bridge._backend_factories["tpu"]  # pylint: disable=protected-access

    def no_chip():
      raise RuntimeError(_NO_TPU_CHIP)

    registration.factory = no_chip
  except (ImportError, AttributeError, KeyError, OSError):  # JAX's internals moved: it tries
    return


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


def warn(message: str) -> None:
  """One `warning: ...` line on stderr, whatever the log verbosity: something the user of a
  command must know that does not stop it (e.g. a damaged checkpoint passed over)."""
  print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)
