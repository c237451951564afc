"""Ways a checkpoint step gets damaged on disk (a killed copy, a full or failing disk, a
hand-edited file), applied to real Orbax step directories: DAMAGES names each with the words
its cause is reported in."""

import os
import shutil


def truncate_arrays(step_dir):
  for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
    os.truncate(f, f.stat().st_size // 2)


def delete_arrays(step_dir):
  for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
    f.unlink()


def garbage_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_bytes(b"\x00{garbage")


def empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def missing_data_item(step_dir):
  shutil.rmtree(step_dir / "data")


DAMAGES = {
  "truncated array file": (truncate_arrays, "OUT_OF_RANGE"),
  "deleted array file": (delete_arrays, "Truncated"),
  "garbage state/_METADATA": (garbage_metadata, "state/_METADATA is unreadable"),
  "emptied step dir": (empty_step_dir, "the step directory is empty"),
  "missing data item": (missing_data_item, "item 'data' is missing"),
}
