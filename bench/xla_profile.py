"""One profiled step of a compiled JAX function: where its time goes, by XLA op.

Used by `bench/step_time.py --profile=DIR`. `jax.profiler.trace` writes a Perfetto trace of
one call; each executed XLA op (a fusion, dot, convolution, copy ...) is an event named after
its instruction in the compiled HLO, whose metadata gives the JAX operation it came from
(`jit(train_step)/jvp(ResNet)/layer1/0/conv2/...`; `transpose(jvp(...))` marks the backward
pass). Summed per instruction and per group:
  * `top`: the most expensive instructions (ms, the HLO kind, the JAX op);
  * `groups`: time by kind of work: forward/backward x convolution/dot (incl. the YNNPACK or
    cuBLAS/cuDNN fusions that hold them)/other, and pure copies/transposes (layout changes);
    "unnamed_*" where XLA left an instruction no metadata to tell the pass by;
  * `busy_ms` (the sum over the op events; on a multi-threaded CPU op events overlap, so this
    can exceed the wall time) and `wall_ms` of the profiled call.

The trace format is Perfetto's JSON (`traceEvents`, complete events with `dur` in us), which
`jax.profiler.trace(..., create_perfetto_trace=True)` writes next to the TensorBoard profile.
"""

import collections
import glob
import gzip
import json
import os
import re
import time

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\S+) ([\w-]+)\((.*)$", re.M)
_COMP = re.compile(r"^%([\w.-]+) .*?\n\}", re.M | re.S)


def _instructions(hlo_text: str) -> dict:
  """Instruction name -> (opcode, JAX op_name, kind of the fused body)."""
  bodies = {m.group(1): m.group(0) for m in _COMP.finditer(hlo_text)}
  out = {}
  for m in _INSTR.finditer(hlo_text):
    name, _, opcode, rest = m.groups()
    calls = re.search(r"calls=%([\w.-]+)", rest)
    body = bodies.get(calls.group(1), "") if calls else ""
    # A fusion's call site may carry no metadata; its body's first op then names it.
    op_name = re.search(r'op_name="([^"]*)"', rest) or re.search(r'op_name="([^"]*)"', body)
    if opcode == "convolution" or " convolution(" in body or "__cudnn$conv" in rest + body:
      kind = "conv"
    elif opcode == "dot" or " dot(" in body or "gemm" in (rest + body).lower():
      kind = "dot"
    elif opcode in ("copy", "transpose") or re.search(r"(copy|transpose)[\w]*_fusion", name):
      kind = "copy"
    else:
      kind = "other"
    op_name = op_name.group(1) if op_name else ""
    window = re.search(r"window=\{size=(\d+)x", rest + body)
    if not op_name and kind == "conv" and window and int(window.group(1)) > 7:
      # No metadata left (XLA's layout passes can drop it); a window wider than any ResNet
      # kernel is the weight gradient, a convolution over the whole feature map.
      op_name = "transpose(weight gradient)"
    out[name] = (opcode, op_name, kind)
  return out


def profile_call(fn, args, hlo_text: str, trace_dir: str, top: int = 15) -> dict:
  """Runs `fn(*args)` once under the profiler; returns {busy_ms, wall_ms, groups, top}.

  `fn` must already be compiled and warm (the call should be a steady-state step).
  """
  import jax  # pylint: disable=g-import-not-at-top

  os.makedirs(trace_dir, exist_ok=True)
  with open(os.path.join(trace_dir, "compiled_hlo.txt"), "w", encoding="utf-8") as f:
    f.write(hlo_text)  # To look an instruction up by the name the trace gives it.
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    wall = time.perf_counter() - t0
  traces = sorted(
    glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
    key=os.path.getmtime,
  )
  if not traces:
    raise RuntimeError(f"profile: no *.trace.json.gz written under {trace_dir}")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  info = _instructions(hlo_text)
  per_instr = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and e.get("name") in info:
      per_instr[e["name"]] += e["dur"] / 1e3
  groups = collections.Counter()
  for name, ms in per_instr.items():
    _, op_name, kind = info[name]
    side = "bwd" if "transpose(" in op_name else "fwd" if op_name else "unnamed"
    groups[kind if kind == "copy" else f"{side}_{kind}"] += ms
  return {
    "out": out,
    "wall_ms": round(wall * 1e3, 1),
    "busy_ms": round(sum(per_instr.values()), 1),
    "groups": {k: round(v, 1) for k, v in groups.most_common()},
    "top": [
      {"ms": round(ms, 2), "hlo": name, "kind": info[name][2], "op": info[name][1][-90:]}
      for name, ms in per_instr.most_common(top)
    ],
    "top_other": [
      {"ms": round(ms, 2), "hlo": name, "op": info[name][1][-90:]}
      for name, ms in per_instr.most_common()
      if info[name][2] == "other"
    ][:top],
  }
