r"""Steady-state train-step time: this library next to its PyTorch peer, in one run.

  python bench/step_time.py --model=convirt --text=minilm --batch=32          # ResNet-50 + MiniLM
  python bench/step_time.py --model=convirt --text=bert-base --batch=16
  python bench/step_time.py --model=resnet50 --batch=16 --image_size=160      # image tower only
  python bench/step_time.py --model=mixed --batch=4                           # ViT-B + MiniLM
  python bench/step_time.py --model=convirt --impl=jax --dtype=bfloat16 --batch=256 --steps=20

For each model, one after the other (never concurrently), with the same thread count:
  * the machine's matmul rate in --dtype: a [n, n] x [n, n] product (n = --peak_n) in JAX
    (`jnp.dot`) and in PyTorch (`torch.mm`), best of 5; the larger is quoted as the machine's
    peak, the denominator of `frac_of_peak` (achieved model FLOP/s / peak);
  * JAX: the jitted, donated `step.train_step` the trainer runs (ConVIRT; `--model=resnet50`:
    the ResNet-50 tower alone, loss = mean square of its pooled features) or
    `bench/mixed_step.bench_jax` (mixed); compile timed apart from the steps;
  * PyTorch, written as the public re-implementations write it: `bench/torch_convirt_step.py`
    (torchvision resnet50 + transformers BertModel, max-pool, the same heads, lambda-InfoNCE,
    Adam, the same frozen layers) or `bench/mixed_step.bench_torch` (timm ViT-B + HF BERT).
Each prints one JSON line (`"impl": "jax" | "torch" | "peak"`), then a summary with pairs/s
and the JAX / PyTorch ratio. The inputs are synthetic and already in memory: the model's
speed, not the input pipeline's (bench/input_pipeline.py). Medians over --steps after warm-up.

Analytic model FLOPs per train step (2 FLOPs per multiply-add; backward = 2x forward, so a
trained layer costs 3x its forward and a frozen one 1x — nothing flows below frozen layers):
  ResNet-50: 4.09e9 MACs per 224^2 image forward, scaling with (image_size / 224)^2, x3.
  Transformer layer, T tokens, width H, MLP width M, attending over C tokens:
    T (4 H^2 + 2 H M) + 2 T C H MACs (QKV/output projections, MLP, scores and weighted sum).
  ConVIRT text: BERT layers at T = C = max_length; embeddings + first half frozen; heads and
    the loss are negligible.
  Mixed: ViT-B (197 tokens incl. the class token; patch embedding 196 x 768 x 3*16*16), BERT
    (all layers trained), each co-attention layer = two cross-attentions (queries of one
    stream, keys/values from the other: T_q (2 H_q^2) + T_kv (2 H_q H_kv) + 2 T_q T_kv H_q)
    then one transformer layer per stream, the pixel decoder (196 tokens), the MLM head
    (T (H^2 + H V)) and the decoder's patch projections; everything trained.
XLA's own cost analysis is printed for JAX as `xla_counted_gflop` (it undercounts custom
calls on GPU). Threads: XLA's CPU thread pool has one thread per core this process may use
(`os.sched_getaffinity`); PyTorch is set to the same number (`--threads` overrides it).
"""

import argparse
import json
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(BENCH, ".."))
sys.path.insert(0, BENCH)

import numpy as np  # noqa: E402

TEXT_SHAPES = {
  "minilm": dict(
    vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
  ),
  "bert-base": dict(
    vocab_size=28996, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
  ),  # Bio_ClinicalBERT, as in the paper
}


def _layer_macs(tokens: int, width: int, mlp: int, context: int) -> float:
  return tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * context * width


def resnet50_flops(batch: int, image_size: int) -> float:
  return 2.0 * 3 * 4.09e9 * (image_size / 224) ** 2 * batch


def model_flops(batch: int, image_size: int, max_length: int, text: dict, frozen: int) -> float:
  """ConVIRT train step (module docstring)."""
  h, l = text["hidden_size"], max_length
  per_layer = _layer_macs(l, h, text["intermediate_size"], l) * batch
  bert = per_layer * (frozen + 3 * (text["num_layers"] - frozen))
  return resnet50_flops(batch, image_size) + 2.0 * bert


def mixed_flops(cfg, batch: int, text: dict) -> float:
  """Mixed model train step (module docstring), everything trained."""
  m = cfg.model
  p, s = m.image.patch_size, m.image.image_size
  patches = (s // p) ** 2
  ti, hi = patches + 1, m.image.hidden_size
  tt, ht, v = cfg.data.max_length, text["hidden_size"], text["vocab_size"]
  vit = patches * 3 * p * p * hi + m.image.num_layers * _layer_macs(
    ti, hi, int(m.image.mlp_ratio * hi), ti
  )
  bert = text["num_layers"] * _layer_macs(tt, ht, text["intermediate_size"], tt)

  def cross(tq, hq, tkv, hkv):
    return tq * 2 * hq * hq + tkv * 2 * hq * hkv + 2 * tq * tkv * hq

  f = m.fusion
  fusion = f.num_layers * (
    cross(tt, ht, ti, hi)
    + cross(ti, hi, tt, ht)
    + _layer_macs(tt, ht, int(f.mlp_ratio * ht), tt)
    + _layer_macs(ti, hi, int(f.mlp_ratio * hi), ti)
  )
  d = m.decoder
  dh = d.hidden_size
  decoder = patches * (hi * dh + dh * p * p) + d.num_layers * _layer_macs(
    patches, dh, int(d.mlp_ratio * dh), patches
  )
  mlm = tt * (ht * ht + ht * v)
  return 2.0 * 3 * batch * (vit + bert + fusion + decoder + mlm)


def _threads() -> int:
  return len(os.sched_getaffinity(0))


def matmul_peak(n: int, with_torch: bool, dtype: str = "float32") -> dict:
  """[n, n] @ [n, n] in `dtype`, best of 5, in JAX (and PyTorch, on its device): FLOP/s."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, a))
  best = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a, a))
    best.append(time.perf_counter() - t0)
  rates = {"jax": 2 * n**3 / min(best), "torch": float("nan")}
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t = torch.randn(n, n, device=dev).to(getattr(torch, dtype))
    torch.mm(t, t)
    sync()
    best = []
    for _ in range(5):
      t0 = time.perf_counter()
      torch.mm(t, t)
      sync()
      best.append(time.perf_counter() - t0)
    rates["torch"] = 2 * n**3 / min(best)
  return {
    "impl": "peak",
    "n": n,
    "matmul_dtype": dtype,
    "jax_dot_gflops": round(rates["jax"] / 1e9, 1),
    "torch_mm_gflops": round(rates["torch"] / 1e9, 1) if with_torch else None,
    "peak_gflops": round(max(r for r in rates.values() if r == r) / 1e9, 1),
  }


def _jax_steps(compiled, state, batch, steps):
  import jax  # pylint: disable=g-import-not-at-top

  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return times, cpu, float(metrics["loss"]), state


def jax_convirt(args) -> dict:
  """The trainer's `step.train_step` on ConVIRT, or the ResNet-50 tower alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from configs import convirt  # pylint: disable=g-import-not-at-top
  from medvl_jax import families  # pylint: disable=g-import-not-at-top
  from medvl_jax.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from medvl_jax.models import resnet  # pylint: disable=g-import-not-at-top
  from medvl_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import step  # pylint: disable=g-import-not-at-top

  n, s, l = args.batch, args.image_size, args.max_length
  batch = batch_lib.random(n, s, l, seed=0)  # The layout of medvl_jax.data.batch, paired rows.
  t0 = time.perf_counter()
  if args.model == "resnet50":
    model = resnet.ResNet50(dtype=jnp.dtype(args.dtype), conv_impl=args.conv)
    mean = jnp.asarray((0.485, 0.456, 0.406))
    std = jnp.asarray((0.229, 0.224, 0.225))

    def prep(images):
      return (jnp.tile(images.astype(jnp.float32) / 255.0, (1, 1, 1, 3)) - mean) / std

    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, s, s, 3)), train=False))(
      jax.random.key(0)
    )
    tx = optax.chain(optax.add_decayed_weights(1e-6), optax.adam(1e-4))
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def train_step(st, b):
      params, stats, opt_state = st

      def loss_of(p):
        feats, upd = model.apply(
          {"params": p, "batch_stats": stats}, prep(b["image"]), train=True, mutable="batch_stats"
        )
        return jnp.mean(jnp.square(feats)), upd["batch_stats"]

      (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), stats, opt_state), {"loss": loss}

    fn = jax.jit(train_step, donate_argnums=0)
    batch = {"image": jnp.asarray(batch["image"])}
    frozen = 0
  else:
    cfg = convirt.get_config()
    cfg.batch_size = n
    cfg.data.image_size, cfg.data.max_length = s, l
    cfg.model.dtype = args.dtype
    cfg.model.image.conv_impl = args.conv
    cfg.model.text.init = ""
    cfg.model.text.update(TEXT_SHAPES[args.text], max_position_embeddings=512)
    model = families.get(cfg.model.name).build(cfg.model)
    init_rng, step_rng = step.rngs(cfg)
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    variables = jax.jit(lambda r: families.init_variables(model, cfg, r), out_shardings=rep)(
      init_rng
    )
    mask = families.get(cfg.model.name).trainable_mask(variables["params"], cfg.model)
    tx = step.make_optimizer(cfg.optimizer, mask)
    state = jax.jit(
      lambda v: step.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=v["params"],
        batch_stats=v["batch_stats"],
        opt_state=tx.init(v["params"]),
      ),
      out_shardings=rep,
    )(variables)
    loss_fn = families.get(cfg.model.name).make_loss(cfg)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    fn = jax.jit(
      lambda st, b: step.train_step(
        st, b, model=model, tx=tx, loss_fn=loss_fn, mask=mask, rng=step_rng
      ),
      donate_argnums=0,
    )
    frozen = cfg.model.text.num_layers // 2
  init_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  times, cpu, loss, state = _jax_steps(compiled, state, batch, args.steps)
  profile = None
  if args.profile:
    import xla_profile  # pylint: disable=g-import-not-at-top

    profile = xla_profile.profile_call(compiled, (state, batch), compiled.as_text(), args.profile)
    del profile["out"]
  n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  return {
    "impl": "jax",
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "n_devices": jax.device_count(),
    "threads": _threads(),
    "conv": args.conv,
    "dtype": args.dtype,
    "params_M": round(n_params / 1e6, 1),
    "init_s": round(init_s, 1),
    "compile_s": round(compile_s, 1),
    "times": [round(t, 3) for t in times],
    "s_per_step_median": round(float(np.median(times)), 4),
    "s_per_step_min": round(min(times), 4),
    "cpu_s_per_step": round(float(np.median(cpu)), 3),
    "xla_counted_gflop": round(xla_flops / 1e9, 1),
    "loss": loss,
    "_frozen": frozen,
    "_profile": profile,
  }


def torch_convirt(args) -> dict:
  import torch_convirt_step  # pylint: disable=g-import-not-at-top

  return {
    "impl": "torch",
    **torch_convirt_step.bench(
      text=args.text,
      batch=args.batch,
      image_size=args.image_size,
      max_length=args.max_length,
      steps=args.steps,
      amp=args.dtype == "bfloat16",
      image_only=args.model == "resnet50",
      profile=bool(args.profile),
    ),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=("convirt", "resnet50", "mixed"), default="convirt")
  ap.add_argument("--text", choices=sorted(TEXT_SHAPES), default="minilm")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--max_length", type=int, default=128)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--conv", choices=("auto", "xla", "dot"), default="auto", help="ResNet conv_impl")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--impl", choices=("both", "jax", "torch"), default="both")
  ap.add_argument("--threads", type=int, default=0, help="PyTorch threads; 0 = JAX's")
  ap.add_argument("--peak_n", type=int, default=2048, help="0 = skip the matmul peak")
  ap.add_argument(
    "--profile",
    default="",
    help="directory: profile one more JAX step there and print its time by XLA op "
    "(bench/xla_profile.py); the PyTorch peer (ConVIRT, resnet50) then also profiles one step "
    "(torch.profiler, top ops by self time in its JSON line)",
  )
  args = ap.parse_args(argv)

  if args.impl != "jax":  # A JAX-only run needs no PyTorch (accelerator images without it).
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(args.threads or _threads())
  head = {
    "model": args.model,
    "text": "none" if args.model == "resnet50" else args.text,
    "batch": args.batch,
    "image_size": args.image_size,
    "max_length": args.max_length,
    "dtype": args.dtype,
  }
  results = {}
  if args.peak_n:
    results["peak"] = matmul_peak(args.peak_n, args.impl != "jax", args.dtype)
    print(json.dumps({**head, **results["peak"]}), flush=True)

  if args.model == "mixed":
    import mixed_step  # pylint: disable=g-import-not-at-top

    from medvl_jax.interop import hf_bert  # pylint: disable=g-import-not-at-top

    cfg = mixed_step._config()  # pylint: disable=protected-access
    cfg.data.max_length = args.max_length
    inputs = mixed_step._inputs(args.batch, cfg.model.image.image_size, args.max_length)  # pylint: disable=protected-access
    bert = hf_bert.read_config(cfg.model.text.init).to_hf()
    text = dict(
      vocab_size=bert["vocab_size"],
      hidden_size=bert["hidden_size"],
      num_layers=bert["num_hidden_layers"],
      intermediate_size=bert["intermediate_size"],
    )
    flops = mixed_flops(cfg, args.batch, text)
    runs = {
      "jax": lambda: {
        "impl": "jax",
        **mixed_step.bench_jax(cfg, inputs, args.steps, profile_dir=args.profile),
      },
      "torch": lambda: mixed_step.bench_torch(cfg, inputs, args.steps),
    }
  else:
    if args.model == "resnet50":
      flops = resnet50_flops(args.batch, args.image_size)
    else:
      shape = TEXT_SHAPES[args.text]
      flops = model_flops(
        args.batch, args.image_size, args.max_length, shape, shape["num_layers"] // 2
      )
    runs = {"jax": lambda: jax_convirt(args), "torch": lambda: torch_convirt(args)}

  for impl in ("jax", "torch"):
    if args.impl not in ("both", impl):
      continue
    r = runs[impl]()
    r.pop("_frozen", None)
    profile = r.pop("_profile", None)
    if profile:
      print(json.dumps({**head, "impl": "jax_profile", **profile}), flush=True)
    sec = r["s_per_step_median"]
    r.update(
      pairs_per_s=round(args.batch / sec, 3),
      model_gflop=round(flops / 1e9, 1),
      model_gflops_per_s=round(flops / sec / 1e9, 2),
    )
    if "peak" in results:
      r["frac_of_peak"] = round(flops / sec / (results["peak"]["peak_gflops"] * 1e9), 3)
    results[impl] = r
    print(json.dumps({**head, **r}), flush=True)

  lines = [f"{args.model} ({head['text']}), batch {args.batch}, {args.image_size}^2, {args.dtype}"]
  if "peak" in results:
    pk = results["peak"]
    lines.append(
      f"  {args.dtype} matmul peak ({pk['n']}^2): JAX {pk['jax_dot_gflops']} GFLOP/s, "
      f"torch {pk['torch_mm_gflops']} GFLOP/s -> peak {pk['peak_gflops']} GFLOP/s"
    )
  for impl in ("jax", "torch"):
    if impl in results:
      r = results[impl]
      extra = f", compile {r['compile_s']} s" if "compile_s" in r else ""
      frac = f", {100 * r['frac_of_peak']:.1f}% of peak" if "frac_of_peak" in r else ""
      lines.append(
        f"  {impl:5s}: {r['s_per_step_median']} s/step ({r.get('cpu_s_per_step')} CPU-s), "
        f"{r['pairs_per_s']} pairs/s, "
        f"{r['model_gflops_per_s']} model GFLOP/s{frac}{extra}"
      )
  if "jax" in results and "torch" in results:
    ratio = results["jax"]["pairs_per_s"] / results["torch"]["pairs_per_s"]
    lines.append(f"  JAX / PyTorch pairs/s: {ratio:.2f}x (model {args.model}, one run)")
    cj, ct = results["jax"].get("cpu_s_per_step"), results["torch"].get("cpu_s_per_step")
    if cj and ct:
      lines.append(f"  PyTorch / JAX CPU-seconds per step: {ct / cj:.2f}x")
  print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
