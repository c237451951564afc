r"""Entry point: `python -m medvl_jax.main --config=configs/convirt.py [--workdir=DIR]`.

Flags follow ml_collections: `--config.batch_size=64`, `--config.model.text.init=/path/bert`.
Re-running the same command on the same workdir resumes from the newest complete checkpoint.
The workdir may be a gs:// URL (docs/storage.md).
"""

# First, before anything can touch a URL: it maps STORAGE_EMULATOR_HOST to each storage
# library's own setting, which the libraries read once.
from medvl_jax import paths  # isort: split

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medvl_jax import cli
from medvl_jax.ckpt import lease as lease_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, optionally with a variant: configs/convirt.py:smoke",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory, a local path or gs://bucket/... (default: runs/<config name>)."
)
_RESTART = flags.DEFINE_bool(
  "restart_from_scratch",
  False,
  "Set the workdir's checkpoints and TensorBoard logs aside (in <workdir>/discarded-<time>/) "
  "and train afresh, also with a config the old run would refuse.",
)
_LEASE_TTL = flags.DEFINE_float(
  "lease_ttl_s",
  lease_lib.DEFAULT_TTL_S,
  "Seconds the run's hold on its workdir lasts unrenewed (renewed every third of it): how long "
  "a run killed on another host can keep the next run on its workdir waiting.",
  lower_bound=3.0,
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.set_up_process(logging.INFO)

  from medvl_jax import config_check  # pylint: disable=g-import-not-at-top
  from medvl_jax.errors import LeaseError, MedvlError  # pylint: disable=g-import-not-at-top
  from medvl_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import loop  # pylint: disable=g-import-not-at-top

  if _COMPILE_ONLY.value:
    _compile_only()
    return
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  try:
    config_check.check_required(_CONFIG.value)  # the start-up reads config.distributed
    distributed.initialize_distributed(_CONFIG.value)
    logging.info("workdir: %s", paths.absolute(workdir))
    loop.train_and_evaluate(
      _CONFIG.value,
      workdir,
      restart_from_scratch=_RESTART.value,
      lease_ttl_s=_LEASE_TTL.value,
    )
    distributed.finish()
  except LeaseError as e:
    # Exit at once: a checkpoint save still in flight was started while this run held its
    # workdir; it is abandoned rather than finished into a workdir that another run owns now
    # (a step counts only once committed, at the end of its save).
    logging.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access
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
  app.run(main, flags_parser=cli.parse_flags)
