r"""Behaviour fingerprint of a smoke run, to prove that a refactor changed nothing.

  python bench/fingerprint.py --data_dir=/tmp/tfds [--config=configs/convirt.py:smoke]

Prints one `key=value` line each for: the SHA-256 of the first 10 global train batches (every
array of the layout, in key order), the per-step train losses of a real smoke run through the
CLI (`python -m medvl_jax.main`, log_every=1; the float32 values from TensorBoard, hashed and
the first/last shown), and the SHA-256 of every leaf of the run's final checkpoint (params,
batch statistics, optimizer state). Run it before and after a change: equal hashes = the same
batches, the same losses bit for bit and the same final checkpoint.
"""

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _config(name: str, data_dir: str):
  import importlib.util

  from ml_collections import config_flags  # noqa: F401  # pylint: disable=unused-import

  path, _, variant = name.partition(":")
  spec = importlib.util.spec_from_file_location("fingerprint_config", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(variant or None)
  cfg.data.data_dir = data_dir
  return cfg


def _hash_arrays(named: list[tuple[str, np.ndarray]]) -> str:
  h = hashlib.sha256()
  for name, value in named:
    value = np.ascontiguousarray(np.asarray(value))
    h.update(f"{name}:{value.dtype}:{value.shape};".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def _batches(cfg, n: int) -> str:
  from medvl_jax.data import streams
  from medvl_jax.data import tokenizer as tokenizer_lib

  tok = tokenizer_lib.from_config(cfg)
  it = streams.create_train_iterator(cfg, tok)
  named = []
  for i in range(n):
    batch = next(it)
    named += [(f"{i}/{k}", batch[k]) for k in sorted(batch)]
  return _hash_arrays(named)


def _run(name: str, data_dir: str, workdir: pathlib.Path) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [
    sys.executable,
    "-m",
    "medvl_jax.main",
    f"--config={name}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.log_every=1",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"smoke run failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _losses(workdir: pathlib.Path) -> list[float]:
  import tensorflow as tf

  out = {}
  for f in sorted((workdir / "tensorboard").rglob("events.out.tfevents.*")):
    for rec in tf.data.TFRecordDataset(str(f)):
      event = tf.compat.v1.Event.FromString(rec.numpy())
      for v in event.summary.value:
        if v.tag == "train_loss":
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return [out[s] for s in sorted(out)]


def _checkpoint(workdir: pathlib.Path) -> tuple[int, str]:
  import jax
  import orbax.checkpoint as ocp

  ckpt_dir = workdir / "checkpoints"
  step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  with ocp.PyTreeCheckpointer() as ckptr:
    state = ckptr.restore(ckpt_dir / str(step) / "state")
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, _hash_arrays([(jax.tree_util.keystr(p), np.asarray(x)) for p, x in flat])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/convirt.py:smoke")
  parser.add_argument("--data_dir", required=True, help="tfds data dir (the sample is built there)")
  parser.add_argument("--batches", type=int, default=10)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cfg = _config(args.config, args.data_dir)
  print(f"batches_sha256={_batches(cfg, args.batches)}", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "run"
    _run(args.config, args.data_dir, workdir)
    losses = _losses(workdir)
    bits = np.asarray(losses, np.float32).tobytes()
    print(
      f"losses_sha256={hashlib.sha256(bits).hexdigest()} steps={len(losses)} "
      f"first={losses[0]!r} last={losses[-1]!r}"
    )
    step, digest = _checkpoint(workdir)
    print(f"checkpoint_step={step} checkpoint_sha256={digest}")


if __name__ == "__main__":
  main()
