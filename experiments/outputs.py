"""What the study writes: files under OUT (each written atomically) with each arm's finished
stages (OUT/arms/<arm>/state.json), and its progress lines on stderr."""

import datetime
import json
import os
import pathlib
import secrets
import sys
import time
from typing import Any

import numpy as np


def log(msg: str) -> None:
  print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic: a temporary file beside `path`, renamed over it."""
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
  try:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def save_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
  tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}.npz")
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


class ArmState:
  """OUT/arms/<arm>/state.json: {'stages': {stage: {'wall_s', ...}}}; atomic writes."""

  def __init__(self, out: pathlib.Path, arm: str):
    self.dir = out / "arms" / arm
    self.dir.mkdir(parents=True, exist_ok=True)
    self.path = self.dir / "state.json"
    self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

  def done(self, stage: str) -> bool:
    return stage in self.data["stages"]

  def mark(self, stage: str, **info: Any) -> None:
    self.data["stages"][stage] = info
    write_json(self.path, self.data)


def now() -> str:
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
