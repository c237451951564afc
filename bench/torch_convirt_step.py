r"""The PyTorch baseline: one ConVIRT train step as the public re-implementations write it.

  python bench/torch_convirt_step.py --text=bert-base --batch=32 [--amp] [--compile]

torchvision resnet50 (fc removed) + transformers BertModel (random weights, the same shape as
bench/step_time.py), max-pooled text features, 2-layer projection heads, the asymmetric InfoNCE
(lambda 0.75, tau 0.1), BERT embeddings + first half of the layers frozen, Adam(lr 1e-4,
weight_decay 1e-6). Same synthetic inputs (`medvl_jax.data.batch.random`) and shapes as
bench/step_time.py, which runs `bench()` after the JAX step in the same process. `--amp` =
bfloat16 autocast (the usual mixed precision), `--compile` = torch.compile.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402

from medvl_jax.data import batch as batch_lib  # noqa: E402  (NumPy only: no JAX needed here)

TEXT_SHAPES = {
  "minilm": dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
  ),
  "bert-base": dict(
    vocab_size=28996,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
  ),
}


class ConVIRT(torch.nn.Module):
  def __init__(self, text_shape: dict, d: int = 512):
    super().__init__()
    self.image = torchvision.models.resnet50()
    self.image.fc = torch.nn.Identity()
    self.text = transformers.BertModel(
      transformers.BertConfig(**text_shape), add_pooling_layer=False
    )
    h = text_shape["hidden_size"]
    self.image_proj = torch.nn.Sequential(
      torch.nn.Linear(2048, d), torch.nn.ReLU(), torch.nn.Linear(d, d)
    )
    self.text_proj = torch.nn.Sequential(
      torch.nn.Linear(h, d), torch.nn.ReLU(), torch.nn.Linear(d, d)
    )
    frozen = text_shape["num_hidden_layers"] // 2
    for p in self.text.embeddings.parameters():
      p.requires_grad_(False)
    for layer in self.text.encoder.layer[:frozen]:
      for p in layer.parameters():
        p.requires_grad_(False)

  def forward(self, images, ids, mask):
    v = self.image_proj(self.image(images))
    hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = hidden.masked_fill(~mask.bool()[..., None], torch.finfo(hidden.dtype).min)
    u = self.text_proj(hidden.max(dim=1).values)
    return v, u


def infonce(v, u, lam=0.75, tau=0.1):
  v, u = F.normalize(v.float(), dim=-1), F.normalize(u.float(), dim=-1)
  logits = v @ u.t() / tau
  target = torch.arange(len(v), device=v.device)
  return lam * F.cross_entropy(logits, target) + (1 - lam) * F.cross_entropy(logits.t(), target)


def bench(
  text: str = "minilm",
  batch: int = 32,
  image_size: int = 224,
  max_length: int = 128,
  steps: int = 5,
  amp: bool = False,
  compile: bool = False,  # noqa: A002  (the torch.compile switch)
  channels_last: bool = False,
  image_only: bool = False,
  profile: bool = False,
) -> dict:
  """Times the train step; `image_only`: the ResNet-50 tower alone (loss = mean square of its
  pooled features), the peer of `bench/step_time.py --model=resnet50`. `profile`: one more
  step under `torch.profiler`, its ops by self time in `profile_top` (ms, calls)."""
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  if image_only:
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
  else:
    model = ConVIRT(TEXT_SHAPES[text])
  model = model.to(dev).train()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(
    [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-6
  )
  n, s, l = batch, image_size, max_length
  data = batch_lib.random(n, s, l, seed=0)  # The same synthetic batch as bench/step_time.py.
  gray = torch.from_numpy(data["image"].transpose(0, 3, 1, 2).copy()).to(dev)  # NHWC -> NCHW
  ids = torch.from_numpy(data["input_ids"].astype(np.int64)).to(dev)
  mask = torch.from_numpy(data["attention_mask"].astype(np.int64)).to(dev)
  mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)

  def train_step():
    images = (gray.float() / 255).expand(-1, 3, -1, -1)
    images = (images - mean) / std
    if channels_last:
      images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      if image_only:
        loss = model(images).float().square().mean()
      else:
        v, u = model(images, ids, mask)
    if not image_only:
      loss = infonce(v, u)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  step_fn = torch.compile(train_step) if compile else train_step
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(2):  # warm-up (and compilation with --compile)
    loss = step_fn()
  sync()
  warm_s = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step_fn()
    sync()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  sec = float(np.median(times))
  top = None
  if profile:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
      acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
      step_fn()
      sync()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    top = [
      {"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
      for e in rows
    ]
  return {
    "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "batch": n,
    "text": "none" if image_only else text,
    "amp_bf16": amp,
    "compile": compile,
    "channels_last": channels_last,
    "warmup_s": round(warm_s, 1),
    "s_per_step_median": round(sec, 4),
    "s_per_step_min": round(min(times), 4),
    "times": [round(t, 3) for t in times],
    "cpu_s_per_step": round(float(np.median(cpu)), 3),
    "examples_per_s": round(n / sec, 2),
    "loss": float(loss.detach()),
    **({"profile_top": top} if top is not None else {}),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--text", choices=sorted(TEXT_SHAPES), default="minilm")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--max_length", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--amp", action="store_true")
  ap.add_argument("--compile", action="store_true")
  ap.add_argument("--channels_last", action="store_true")
  args = ap.parse_args()
  print(json.dumps(bench(**vars(args))))


if __name__ == "__main__":
  main()
