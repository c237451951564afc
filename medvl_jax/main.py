r"""Entry point: `python -m medvl_jax.main --config=configs/convirt.py [--workdir=DIR]`.

Flags follow ml_collections: `--config.batch_size=64`, `--config.model.text.init=/path/bert`.
Re-running the same command on the same workdir resumes from the newest complete checkpoint.
"""

import logging as pylogging
import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from medvl_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, optionally with a variant: configs/convirt.py:smoke",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_RESTART = flags.DEFINE_bool(
  "restart_from_scratch",
  False,
  "Set the workdir's checkpoints and TensorBoard logs aside (in <workdir>/discarded-<time>/) "
  "and train afresh, also with a config the old run would refuse.",
)
# Ahead-of-time compile (medvl_jax/train/aot.py): memory and FLOPs of one step, then exit, no
# training.
_COMPILE_ONLY = flags.DEFINE_bool(
  "compile_only", False, "Compile the train step for --topology, report memory and FLOPs, exit."
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", "local", "--compile_only target: a TPU slice as libtpu names it (v5e:4x4) or local."
)
flags.mark_flags_as_required(["config"])


def default_workdir(config_filename: str) -> str:
  """configs/convirt.py -> runs/convirt; configs/convirt.py:smoke -> runs/convirt_smoke."""
  path, _, variant = config_filename.partition(":")
  name = pathlib.Path(path).stem
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


class _QuietLibraries(pylogging.Filter):
  """Keeps the console readable: INFO chatter of Orbax/tfds/clu internals is dropped, and
  their warnings and errors stay one line each (no traceback: a failed save or restore is
  reported by medvl_jax itself, in one line naming the step and the cause)."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/clu/", "/etils/")

  def filter(self, record):
    if not any(n in record.pathname for n in self.NOISY):
      return True
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record.levelno >= pylogging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=g-import-not-at-top

  from medvl_jax.errors import MedvlError  # pylint: disable=g-import-not-at-top
  from medvl_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import loop  # pylint: disable=g-import-not-at-top

  # Re-runs and resumes reuse compiled programs (compile of the full model: ~10 s on 2 cores).
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/medvl_jax/xla"))
  logging.get_absl_handler().addFilter(_QuietLibraries())
  cli.quiet_closed_loop_errors()
  if _COMPILE_ONLY.value:
    _compile_only()
    return
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  try:
    distributed.initialize_distributed(_CONFIG.value)
    logging.info("workdir: %s", os.path.abspath(workdir))
    loop.train_and_evaluate(_CONFIG.value, workdir, restart_from_scratch=_RESTART.value)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))


def _compile_only() -> None:
  """--compile_only: the report on stdout; exit 1 when the step does not fit the chip."""
  from medvl_jax.errors import MedvlError  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import aot  # pylint: disable=g-import-not-at-top

  try:
    report = aot.compile_step(_CONFIG.value, _TOPOLOGY.value)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))
  print("\n".join(report.lines()), flush=True)
  if report.fits is False:
    raise SystemExit(1)


FLAGS = flags.FLAGS


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_flags)
