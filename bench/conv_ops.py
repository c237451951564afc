r"""ResNet-50's convolutions one by one: forward, input gradient and weight gradient, XLA vs torch.

  python bench/conv_ops.py                 # batch 16, 224^2 maps, JAX then PyTorch
  python bench/conv_ops.py --impl=jax --batch=32

For each distinct conv shape of ResNet-50 at 224^2 (the 3x3s of the four stages, a strided
3x3, the 7x7 stem; `--shapes=all` adds the 1x1s), the best of `--reps` timings of:
  JAX:   fwd (XLA's convolution), dx and dw (each the jitted VJP of that convolution alone,
         i.e. what autodiff makes of `flax.linen.Conv`), and `tap_dw`: the weight gradient as
         `resnet.tap_conv` computes it (k*k per-tap dots), for the 1x1s `channel_dw`
         (`resnet.channel_dot`'s: x transposed, one dot);
  torch: fwd (`torch.nn.functional.conv2d`, NCHW as torchvision runs it), dx (`torch.autograd.grad`
         w.r.t. the input only) and dw (w.r.t. the weight only), fwd time subtracted.
One JSON line per shape with milliseconds and GFLOP/s (2 * N * Ho * Wo * Cout * Cin * k * k
per pass). Threads: JAX uses the process's cores; torch gets as many (`torch.set_num_threads`).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from medvl_jax.models import resnet  # noqa: E402

# (map size, in, out, kernel, stride) of ResNet-50 at 224^2.
SHAPES_KXK = [
  (56, 64, 64, 3, 1),
  (56, 128, 128, 3, 2),
  (28, 128, 128, 3, 1),
  (14, 256, 256, 3, 1),
  (7, 512, 512, 3, 1),
  (224, 3, 64, 7, 2),
]
SHAPES_1X1 = [(56, 64, 256, 1, 1), (56, 256, 64, 1, 1), (28, 512, 128, 1, 1), (7, 2048, 512, 1, 1)]


def _best(fn, reps):
  fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return min(ts)


def jax_ops(n, h, cin, cout, k, s, reps):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.05, jnp.float32)
  conv = resnet._conv_same  # pylint: disable=protected-access
  y = jax.jit(conv, static_argnums=2)(x, w, s)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  fwd = jax.jit(lambda x, w: conv(x, w, s))
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w, s), x)[1](g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w, s), w)[1](g)[0])
  if k == 1:
    # channel_dot sees the (subsampled) input as [..., in] and the kernel as [in, out].
    def ours(x, w, g):
      cols = x[:, ::s, ::s, :]
      return jax.vjp(lambda w2: resnet.channel_dot(cols, w2), w[0, 0])[1](g)[0]

    name = "channel_dw"
  else:

    def ours(x, w, g):
      return jax.vjp(lambda w: resnet.tap_conv(x, w, s), w)[1](g)[0]

    name = "tap_dw"
  ours = jax.jit(ours)
  ref = dw(x, w, g)
  got = ours(x, w, g).reshape(ref.shape)
  err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
  out = {
    "fwd": _best(lambda: jax.block_until_ready(fwd(x, w)), reps),
    "dx": _best(lambda: jax.block_until_ready(dx(x, w, g)), reps),
    "dw": _best(lambda: jax.block_until_ready(dw(x, w, g)), reps),
    name: _best(lambda: jax.block_until_ready(ours(x, w, g)), reps),
  }
  return out, y.shape, {f"{name}_rel_err_vs_dw": float(f"{err:.1e}")}


def torch_ops(n, h, cin, cout, k, s, reps, threads):
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  x = torch.randn(n, cin, h, h)
  w = torch.randn(cout, cin, k, k) * 0.05

  def f(x, w):
    return torch.nn.functional.conv2d(x, w, stride=s, padding=k // 2)

  with torch.no_grad():
    fwd = _best(lambda: f(x, w), reps)
  g = torch.randn_like(f(x, w))
  xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
  t_dx = _best(lambda: torch.autograd.grad(f(xg, w), [xg], g), reps) - fwd
  t_dw = _best(lambda: torch.autograd.grad(f(x, wg), [wg], g), reps) - fwd
  return {"fwd": fwd, "dx": t_dx, "dw": t_dw}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--impl", choices=("both", "jax", "torch"), default="both")
  ap.add_argument("--shapes", choices=("kxk", "all"), default="kxk")
  args = ap.parse_args()
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  shapes = SHAPES_KXK + (SHAPES_1X1 if args.shapes == "all" else [])
  for h, cin, cout, k, s in shapes:
    row = {"map": h, "in": cin, "out": cout, "kernel": k, "stride": s, "batch": args.batch}
    ho = (h + 2 * (k // 2) - k) // s + 1
    gflop = 2 * args.batch * ho * ho * cout * cin * k * k / 1e9
    row["gflop_per_pass"] = round(gflop, 2)
    if args.impl in ("both", "jax"):
      t, _, extra = jax_ops(args.batch, h, cin, cout, k, s, args.reps)
      row.update({f"jax_{p}_ms": round(v * 1e3, 1) for p, v in t.items()})
      row.update({f"jax_{p}_gflops": round(gflop / v, 1) for p, v in t.items()})
      row.update(extra)
    if args.impl in ("both", "torch"):
      t = torch_ops(args.batch, h, cin, cout, k, s, args.reps, threads)
      row.update({f"torch_{p}_ms": round(v * 1e3, 1) for p, v in t.items()})
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
