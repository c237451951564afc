r"""Host overhead of the training loop: its wall time per step vs the step's compute alone.

  python bench/host_overhead.py --model=smoke                    # configs/convirt.py:smoke
  python bench/host_overhead.py --model=full --batch=8           # full-size ConVIRT (R50+MiniLM)
  python bench/host_overhead.py --model=smoke --log_every=1      # the smoke config's own logging

Two figures, in one process, on the real bundled sample:
  loop:   seconds per step of the real training loop (`loop.train_and_evaluate`: input
          pipeline, transfer, non-finite guard, metrics, logging), timed between its progress
          lines (the first `--warmup` steps, the compile, the final evaluation and checkpoint
          are outside the window).
  device: seconds per step of the same compiled update step run back to back on batches of
          the same pipeline already resident on the devices, blocking once at the end (so it
          is the device-busy time per step, with every dispatch hidden behind the previous
          step).
  The two are measured alternately (`--rounds`, default 3; medians), so load from other
  processes on a shared machine hits both alike. overhead = (loop - device) / loop, the
  fraction of each step the device does not compute. The same from the process's CPU time
  (all threads) per step, which load from other processes disturbs far less than wall time:
  cpu_overhead = (loop CPU - device CPU) / loop CPU, the loop's extra work per step.
On CPU the "device" is the same cores the input pipeline runs on, so its threads competing
with XLA's count as overhead too. Prints one JSON line.
"""

import argparse
import gc
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "medvl_jax_bench_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from absl import logging as absl_logging  # noqa: E402  # pylint: disable=g-import-not-at-top
import jax  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import convirt  # noqa: E402  # pylint: disable=g-import-not-at-top
from medvl_jax.data import sources, streams  # noqa: E402
from medvl_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from medvl_jax.parallel import sharding  # noqa: E402
from medvl_jax.train import loop, program  # noqa: E402


def config_for(args):
  cfg = convirt.get_config("smoke" if args.model == "smoke" else None)
  if args.batch:
    cfg.batch_size = args.batch
  cfg.model.dtype = args.dtype
  cfg.data.data_dir = args.data_dir
  cfg.log_every = args.log_every
  cfg.total_steps = args.warmup + args.steps
  # Evaluation and checkpoint only after the last step (outside the timed windows).
  cfg.eval_every = cfg.checkpoint_every = cfg.total_steps
  return cfg


class DeviceStep:
  """The compiled update step on real batches of the pipeline already resident on the devices."""

  def __init__(self, cfg):
    mesh = sharding.make_mesh(axes=cfg.get("mesh", sharding.DEFAULT_AXES))
    prog = program.build(cfg, mesh)
    var_sharding = {"params": prog.state_sharding.params}
    if "batch_stats" in prog.abstract_vars:
      var_sharding["batch_stats"] = prog.state_sharding.batch_stats
    variables = jax.jit(prog.init_fn, out_shardings=var_sharding)(prog.init_rng)
    self.state = jax.jit(prog.make_state, out_shardings=prog.state_sharding)(variables)
    tokenizer = tokenizer_lib.from_config(cfg)
    it = streams.create_train_iterator(cfg, tokenizer, start_step=0)
    self.batches = [sharding.to_global(next(it), mesh) for _ in range(2)]
    del it
    self.step_fn = prog.jit_step().lower(self.state, self.batches[0]).compile()
    self.seconds_per_step(1)  # warm-up

  def seconds_per_step(self, steps: int) -> tuple[float, float]:
    """(wall, CPU) s/step back to back, blocking once at the end (each dispatch is hidden
    behind the previous step)."""
    state = self.state
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
      state, metrics = self.step_fn(state, self.batches[i % 2])
    jax.block_until_ready((state, metrics))
    self.state = state
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


class _Marks(logging.Handler):
  """(step, wall, CPU time of the process) at each of the loop's progress lines."""

  def __init__(self):
    super().__init__()
    self.marks = []

  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith("step ") and "/" in msg.split(" ", 2)[1]:
      step = int(msg.split(" ", 2)[1].split("/")[0])
      self.marks.append((step, time.perf_counter(), time.process_time()))


def loop_seconds_per_step(cfg, warmup: int) -> tuple[float, float]:
  """(wall, CPU) s/step of the real loop between its first progress line at or after
  `warmup` steps and its last (the final evaluation and checkpoint come after that line)."""
  marks = _Marks()
  logger = logging.getLogger("absl")
  logger.addHandler(marks)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      loop.train_and_evaluate(cfg, workdir)
  finally:
    logger.removeHandler(marks)
  timed = [m for m in marks.marks if m[0] >= warmup]
  if len(timed) < 2:
    raise SystemExit("error: no log window after the warm-up (raise --steps or lower --log_every)")
  (s0, w0, c0), (s1, w1, c1) = timed[0], timed[-1]
  return (w1 - w0) / (s1 - s0), (c1 - c0) / (s1 - s0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", choices=("smoke", "full"), default="smoke")
  ap.add_argument("--batch", type=int, default=0, help="0 = the config's")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--warmup", type=int, default=2, help="loop steps left out of the figure")
  ap.add_argument("--steps", type=int, default=20, help="timed loop steps (and device steps)")
  ap.add_argument("--log_every", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3, help="device/loop measurements alternated")
  ap.add_argument(
    "--data_dir",
    default=os.path.join(tempfile.gettempdir(), "medvl_jax_bench_tfds"),
    help="tfds data dir; the bundled sample is built into it on first use",
  )
  args = ap.parse_args()
  absl_logging.set_verbosity(absl_logging.INFO)  # the loop's progress lines mark the window
  cfg = config_for(args)
  sources.prepare(cfg)
  dev, loop = [], []
  for _ in range(args.rounds):  # alternated, so load from other processes hits both alike
    device = DeviceStep(cfg)  # rebuilt per round (compile cache): one model in memory at a time
    dev.append(device.seconds_per_step(args.steps))
    del device
    gc.collect()
    loop.append(loop_seconds_per_step(cfg, args.warmup))
  dev_s, loop_s = (float(np.median([d[0] for d in dev])), float(np.median([x[0] for x in loop])))
  dev_c, loop_c = (float(np.median([d[1] for d in dev])), float(np.median([x[1] for x in loop])))
  print(
    json.dumps(
      {
        "model": args.model,
        "batch": cfg.batch_size,
        "image_size": cfg.data.image_size,
        "dtype": cfg.model.dtype,
        "log_every": cfg.log_every,
        "steps": args.steps,
        "rounds": args.rounds,
        "loop_s_per_step": round(loop_s, 4),
        "device_s_per_step": round(dev_s, 4),
        "overhead_fraction": round((loop_s - dev_s) / loop_s, 4),
        "per_round_overhead": [round((lp[0] - d[0]) / lp[0], 4) for d, lp in zip(dev, loop)],
        "loop_cpu_s_per_step": round(loop_c, 4),
        "device_cpu_s_per_step": round(dev_c, 4),
        "cpu_overhead_fraction": round((loop_c - dev_c) / loop_c, 4),
        "per_round_cpu_overhead": [round((lp[1] - d[1]) / lp[1], 4) for d, lp in zip(dev, loop)],
        "load_average": os.getloadavg(),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
      }
    )
  )


if __name__ == "__main__":
  main()
