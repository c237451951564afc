r"""Per-device temporary memory of the compiled contrastive loss + gradient, by `loss.impl`.

  python bench/loss_memory.py                       # 8 simulated CPU devices, N = 256 .. 8192
  python bench/loss_memory.py --sizes=1024,4096 --dim=64 --lam=0.5

Compiles (never runs) `jax.value_and_grad` of `losses.contrastive.loss` w.r.t. both embeddings
on an [N, dim] batch sharded over a 1-D 'data' mesh, and prints the compiled memory analysis'
`temp_size_in_bytes` (per device: XLA compiles one SPMD program per device) for
'dense' on 1 device, 'dense' on D devices (XLA's own layout of the N x N logits), 'gather'
(~2 N^2 / D floats per direction pair) and 'ring' (~2 (N / D)^2). On a CPU host the device count
is simulated (XLA_FLAGS=--xla_force_host_platform_device_count, set here before jax loads);
on an accelerator host it is the real chips. Prints a Markdown table, then one JSON line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--sizes", default="256,512,1024,2048,4096,8192")
  parser.add_argument("--dim", type=int, default=32, help="embedding dimension")
  parser.add_argument("--lam", type=float, default=0.75)
  args = parser.parse_args()
  if "JAX_PLATFORMS" not in os.environ or os.environ["JAX_PLATFORMS"] == "cpu":
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from medvl_jax.losses import contrastive  # pylint: disable=g-import-not-at-top
  from medvl_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

  devices = jax.devices()[: args.devices]
  meshes = {1: sharding.make_mesh(devices[:1]), len(devices): sharding.make_mesh(devices)}

  def temp_bytes(n: int, impl: str, d: int) -> int:
    mesh = meshes[d]
    rows = sharding.batch_sharding(mesh)

    def loss(v, u, m):
      return contrastive.loss(v, u, lam=args.lam, temperature=0.1, mask=m, impl=impl, mesh=mesh)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(rows, rows, rows))
    emb = jax.ShapeDtypeStruct((n, args.dim), np.float32, sharding=rows)
    mask = jax.ShapeDtypeStruct((n,), np.bool_, sharding=rows)
    return int(fn.lower(emb, emb, mask).compile().memory_analysis().temp_size_in_bytes)

  d = len(devices)
  columns = [("dense", 1), ("dense", d), ("gather", d), ("ring", d)]
  sizes = [int(s) for s in args.sizes.split(",")]
  print(f"{jax.devices()[0].platform} x {d} devices, dim {args.dim}, jax {jax.__version__}")
  print("| N | " + " | ".join(f"{impl}, {k} dev (MiB)" for impl, k in columns) + " |")
  print("|---:|" + "---:|" * len(columns))
  table = {}
  for n in sizes:
    row = {f"{impl}@{k}": temp_bytes(n, impl, k) for impl, k in columns}
    table[n] = row
    cells = " | ".join(f"{b / 2**20:,.2f}" for b in row.values())
    print(f"| {n:,} | {cells} |", flush=True)
  print(json.dumps({"devices": d, "dim": args.dim, "temp_bytes": table}))


if __name__ == "__main__":
  main()
