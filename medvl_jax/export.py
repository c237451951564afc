r"""Export a run to PyTorch / Hugging Face files (the library: `medvl_jax.interop.export`).

  python -m medvl_jax.export --workdir=runs/convirt --out=exported [--step=N] [--overwrite]

A checkpoint whose params or batch statistics hold NaN/inf is refused (one line, exit 2) unless
`--allow_nonfinite`. OUT gets the run's family's files, export.json and README.md (a model
card). WORKDIR and OUT may be gs:// URLs. A local OUT is written into a sibling temporary
directory renamed to OUT when complete; a gs:// OUT gets export.json last, and a folder
without it is incomplete (see `medvl_jax.interop.export`).
"""

# First, before anything can touch a URL: it maps STORAGE_EMULATOR_HOST to each storage
# library's own setting, which the libraries read once.
from medvl_jax import paths  # isort: split

from absl import app, flags, logging

from medvl_jax import cli
from medvl_jax.errors import MedvlError
from medvl_jax.interop import export as export_lib


def _define_flags() -> None:
  """Defined only when run as a script, so importing this module defines no global flags."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints/).")
  flags.DEFINE_string(
    "out", None, "Output directory; must not exist or be empty unless --overwrite."
  )
  flags.DEFINE_string(
    "step",
    None,
    "Checkpoint step to export: a number, or 'best' (lowest validation loss); default: the latest.",
  )
  flags.DEFINE_bool("overwrite", False, "Replace a previous export in --out.")
  flags.DEFINE_bool(
    "allow_nonfinite", False, "Export even if the checkpoint's weights hold NaN/inf values."
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fl = flags.FLAGS
  cli.set_up_process(logging.ERROR)  # Orbax's INFO/WARNING chatter on read-only restores.
  try:
    from medvl_jax.ckpt import checkpoint  # pylint: disable=g-import-not-at-top  (after set-up)

    step = checkpoint.resolve_step(fl.workdir, fl.step)
    meta = export_lib.export(fl.workdir, fl.out, step, fl.overwrite, fl.allow_nonfinite)
  except MedvlError as e:
    logging.flush()
    cli.die(str(e))
  print(f"exported step {meta['step']} of {meta['source_workdir']} to {paths.absolute(fl.out)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
