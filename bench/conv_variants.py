r"""ResNet-50 train step with each conv computed a different way, timed interleaved in one run.

  python bench/conv_variants.py --batch=16 --image_size=128 --rounds=3
  python bench/conv_variants.py --batch=16 --image_size=224 --variants=xla,dot

The step of `bench/step_time.py --model=resnet50` (ResNet-50 tower, loss = mean square of the
pooled features, BatchNorm in train mode, Adam). Variants (`resnet.DotConv`: a dot for 1x1,
im2col + dot for k x k; `resnet.TapConv`: XLA's conv with the weight gradient as per-tap dots;
the rest `flax.linen.Conv`):
  xla     every conv flax.linen.Conv       dot     every conv DotConv
  dot1x1  the 1x1s DotConv (`resnet.channel_dot`, whose backward computes the weight gradient
          from x transposed), the rest XLA convs
  dot1x1_autodiff  as dot1x1, but the 1x1s' backward is JAX's autodiff of `jnp.dot` (the
          library before 2026-12-06)
  library the library's conv_impl='dot': 1x1s DotConv, 3x3s TapConv, the 7x7 stem XLA's conv
  tap_all as library, but the stem TapConv too
  dotkxk  the 3x3s and the 7x7 stem DotConv only
  dot_nostem  all DotConv but the 7x7 stem
Every variant is compiled first; then each round runs one step of every variant in turn, so a
shared machine's load drifts over all of them alike. Prints one JSON line per variant (median
wall and CPU seconds per step over the rounds) and each variant's speed relative to 'xla'.
The variants have the same parameters, so the same initial state is fed to each.
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
import optax  # noqa: E402

from medvl_jax.data import batch as batch_lib  # noqa: E402
from medvl_jax.models import resnet  # noqa: E402

_PLAIN = resnet._conv  # pylint: disable=protected-access
_CHANNEL_DOT = resnet.channel_dot

# Variant -> (kernel size -> how that conv is computed): 'xla' flax.linen.Conv, 'dot'
# resnet.DotConv (1x1: a dot; k x k: im2col + dot), 'tap' resnet.TapConv (XLA conv, weight
# gradient by per-tap dots).
VARIANTS = {
  "xla": lambda k: "xla",
  "dot": lambda k: "dot",
  "dot1x1": lambda k: "dot" if k == 1 else "xla",
  "dot1x1_autodiff": lambda k: "dot" if k == 1 else "xla",
  "library": lambda k: {1: "dot", 3: "tap"}.get(k, "xla"),
  "tap_all": lambda k: "dot" if k == 1 else "tap",
  "dotkxk": lambda k: "dot" if k > 1 else "xla",
  "dot_nostem": lambda k: "dot" if k < 7 else "xla",
}


def _patched(how):
  def conv(features, kernel, stride, name, dtype, impl="xla"):
    del impl
    cls = {"dot": resnet.DotConv, "tap": resnet.TapConv}.get(how(kernel))
    if cls is not None:
      return cls(features, kernel, stride, dtype, name=name)
    return _PLAIN(features, kernel, stride, name, dtype, "xla")

  return conv


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--image_size", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args()
  names = args.variants.split(",")
  n, s = args.batch, args.image_size
  images = jnp.asarray(batch_lib.random(n, s, 8, seed=0)["image"])
  mean = jnp.asarray((0.485, 0.456, 0.406))
  std = jnp.asarray((0.229, 0.224, 0.225))
  tx = optax.chain(optax.add_decayed_weights(1e-6), optax.adam(1e-4))
  model = resnet.ResNet50()
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, s, s, 3)), train=False))(
    jax.random.key(0)
  )

  def make_step():
    def train_step(st, imgs):
      params, stats, opt_state = st
      x = (jnp.tile(imgs.astype(jnp.float32) / 255.0, (1, 1, 1, 3)) - mean) / std

      def loss_of(p):
        feats, upd = model.apply(
          {"params": p, "batch_stats": stats}, x, train=True, mutable="batch_stats"
        )
        return jnp.mean(jnp.square(feats)), upd["batch_stats"]

      (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), stats, opt_state), loss

    return jax.jit(train_step)

  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  compiled, compile_s = {}, {}
  for name in names:
    resnet._conv = _patched(VARIANTS[name])  # pylint: disable=protected-access
    resnet.channel_dot = jnp.dot if name.endswith("_autodiff") else _CHANNEL_DOT
    t0 = time.perf_counter()
    compiled[name] = make_step().lower(state, images).compile()
    compile_s[name] = time.perf_counter() - t0
  resnet._conv = _PLAIN  # pylint: disable=protected-access
  resnet.channel_dot = _CHANNEL_DOT
  states = {name: state for name in names}
  losses = {}
  for name in names:  # warm-up
    states[name], loss = compiled[name](states[name], images)
    losses[name] = float(loss)
  wall = {name: [] for name in names}
  cpu = {name: [] for name in names}
  for _ in range(args.rounds):
    for name in names:
      t0, c0 = time.perf_counter(), time.process_time()
      states[name], loss = compiled[name](states[name], images)
      jax.block_until_ready(loss)
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  base = names[0]
  for name in names:
    print(
      json.dumps(
        {
          "variant": name,
          "batch": n,
          "image_size": s,
          "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compile_s": round(compile_s[name], 1),
          "times": [round(t, 3) for t in wall[name]],
          "s_per_step_median": round(float(np.median(wall[name])), 3),
          "cpu_s_per_step": round(float(np.median(cpu[name])), 3),
          f"speed_vs_{base}": round(float(np.median(wall[base]) / np.median(wall[name])), 3),
          f"cpu_speed_vs_{base}": round(float(np.median(cpu[base]) / np.median(cpu[name])), 3),
          "first_loss": losses[name],
        }
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
