r"""One train step of the full-size mixed-data model: JAX next to a PyTorch equivalent.

  python bench/mixed_step.py --batch=4 [--steps=3] [--only=jax|torch]

JAX: `configs/mixed.py` default model (ViT-B/16 at 224, the MiniLM-shaped BERT, 2 co-attention
layers, 4x512 pixel decoder), `families.mixed.forward_and_loss` under `jax.value_and_grad`,
optax Adam, jitted. PyTorch: the same network as public PyTorch code writes it (timm
`vit_base_patch16_224` with masked patches hidden from attention, `transformers.BertModel`,
`nn.MultiheadAttention` co-attention, timm `Block`s in the decoder, tied MLM head, the same masks
and losses), torch.optim.Adam. Synthetic paired inputs (every row has image and text, so all
three losses run), random weights; medians over `--steps` after 2 warm-up steps. Prints one
JSON line each.
"""

import argparse
import importlib.util
import json
import math
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _config():
  spec = importlib.util.spec_from_file_location("mixed_config", REPO / "configs" / "mixed.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _inputs(batch, size, length, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(16, length, size=batch)
  ids = rng.integers(1000, 28000, (batch, length)).astype(np.int32)
  att = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 101
  ids[att == 0] = 0
  return {
    "image": rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8),
    "input_ids": ids,
    "attention_mask": att,
    "has_image": np.ones(batch, bool),
    "has_text": np.ones(batch, bool),
    "source": np.zeros(batch, np.int32),
  }


def _time(step, steps):
  t0 = time.perf_counter()
  for _ in range(2):
    loss = step()
  warm = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return warm, times, cpu, loss


def bench_jax(cfg, batch_np, steps, profile_dir=""):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from medvl_jax.families import mixed as mixed_family  # pylint: disable=g-import-not-at-top
  from medvl_jax.models import mixed  # pylint: disable=g-import-not-at-top

  model = mixed.from_config(cfg.model)
  batch = jax.tree_util.tree_map(jax.numpy.asarray, batch_np)
  params = mixed.init(model, jax.random.key(0), batch)["params"]
  opt = optax.adam(cfg.optimizer.lr)
  state = opt.init(params)

  @jax.jit
  def train_step(params, state, key):
    k_mask, k_drop = jax.random.split(key)

    def loss_fn(p):
      return mixed_family.forward_and_loss(
        model, {"params": p}, batch, {"masking": k_mask, "dropout": k_drop}, cfg.loss, True
      )

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  t0 = time.perf_counter()
  compiled = train_step.lower(params, state, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  carry = {"params": params, "state": state, "i": 0}

  def step():
    carry["i"] += 1
    carry["params"], carry["state"], loss = compiled(
      carry["params"], carry["state"], jax.random.key(carry["i"])
    )
    return float(loss)

  warm, times, cpu, loss = _time(step, steps)
  profile = None
  if profile_dir:
    import xla_profile  # pylint: disable=g-import-not-at-top

    args = (carry["params"], carry["state"], jax.random.key(carry["i"] + 1))
    profile = xla_profile.profile_call(compiled, args, compiled.as_text(), profile_dir)
    del profile["out"]
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6
  return {
    "impl": "jax",
    "jax": jax.__version__,
    "params_M": round(n_params, 1),
    "compile_s": round(compile_s, 1),
    "warmup_s": round(warm, 1),
    "s_per_step_median": round(float(np.median(times)), 3),
    "s_per_step_min": round(min(times), 3),
    "times": [round(t, 3) for t in times],
    "cpu_s_per_step": round(float(np.median(cpu)), 3),
    "loss": loss,
    "_profile": profile,
  }


def bench_torch(cfg, batch_np, steps):
  import timm  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import Block  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from medvl_jax.interop import hf_bert  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  m = cfg.model
  bert_cfg = hf_bert.read_config(m.text.init).to_hf()
  vocab, tsize = bert_cfg["vocab_size"], bert_cfg["hidden_size"]
  isize, p, s = m.image.hidden_size, m.image.patch_size, m.image.image_size
  grid = s // p

  class CoAttention(torch.nn.Module):
    def __init__(self):
      super().__init__()
      f = m.fusion
      self.tn, self.inorm = torch.nn.LayerNorm(tsize, eps=1e-6), torch.nn.LayerNorm(isize, 1e-6)
      self.t2i = torch.nn.MultiheadAttention(
        tsize, f.num_heads, dropout=f.dropout, kdim=isize, vdim=isize, batch_first=True
      )
      self.i2t = torch.nn.MultiheadAttention(
        isize, f.num_heads, dropout=f.dropout, kdim=tsize, vdim=tsize, batch_first=True
      )
      drop = dict(qkv_bias=True, proj_drop=f.dropout, attn_drop=f.dropout)
      self.tb = Block(tsize, f.num_heads, f.mlp_ratio, **drop)
      self.ib = Block(isize, f.num_heads, f.mlp_ratio, **drop)

    def forward(self, t, i, t_pad, i_pad):
      tn, inn = self.tn(t), self.inorm(i)
      t = t + self.t2i(tn, inn, inn, key_padding_mask=i_pad, need_weights=False)[0]
      i = i + self.i2t(inn, tn, tn, key_padding_mask=t_pad, need_weights=False)[0]
      t_bias = torch.zeros_like(t_pad, dtype=t.dtype).masked_fill(t_pad, -1e9)[:, None, None]
      i_bias = torch.zeros_like(i_pad, dtype=i.dtype).masked_fill(i_pad, -1e9)[:, None, None]
      return self.tb(t, attn_mask=t_bias), self.ib(i, attn_mask=i_bias)

  class Mixed(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=s,
        patch_size=p,
        embed_dim=isize,
        depth=m.image.num_layers,
        num_heads=m.image.num_heads,
      )
      self.bert = transformers.BertModel(
        transformers.BertConfig(**bert_cfg), add_pooling_layer=False
      )
      self.fusion = torch.nn.ModuleList(CoAttention() for _ in range(m.fusion.num_layers))
      self.mlm_dense = torch.nn.Linear(tsize, tsize)
      self.mlm_norm = torch.nn.LayerNorm(tsize, eps=1e-12)
      self.mlm_bias = torch.nn.Parameter(torch.zeros(vocab))
      d = m.decoder
      self.dec_embed = torch.nn.Linear(isize, d.hidden_size)
      self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, d.hidden_size))
      self.dec_pos = torch.nn.Parameter(torch.zeros(1, grid * grid, d.hidden_size))
      self.dec_blocks = torch.nn.Sequential(
        *[
          Block(d.hidden_size, d.num_heads, d.mlp_ratio, qkv_bias=True) for _ in range(d.num_layers)
        ]
      )
      self.dec_norm = torch.nn.LayerNorm(d.hidden_size, eps=1e-6)
      self.dec_pred = torch.nn.Linear(d.hidden_size, p * p)

      def proj(n):
        return torch.nn.Sequential(
          torch.nn.Linear(n, m.projection_hidden),
          torch.nn.ReLU(),
          torch.nn.Linear(m.projection_hidden, m.projection_dim),
        )

      self.image_proj, self.text_proj = proj(isize), proj(tsize)

    def forward(self, images, ids, att, patch_mask):
      x = self.vit._pos_embed(self.vit.patch_embed(images))
      i_pad = torch.cat([torch.zeros_like(patch_mask[:, :1]), patch_mask], 1)
      bias = torch.zeros_like(i_pad, dtype=x.dtype).masked_fill(i_pad, -1e9)[:, None, None]
      for blk in self.vit.blocks:
        x = blk(x, attn_mask=bias)
      img = self.vit.norm(x)
      txt = self.bert(input_ids=ids, attention_mask=att).last_hidden_state
      pooled = txt.masked_fill(~att.bool()[..., None], torch.finfo(txt.dtype).min).amax(1)
      v, u = self.image_proj(img[:, 0]), self.text_proj(pooled)
      t_pad = ~att.bool()
      for layer in self.fusion:
        txt, img = layer(txt, img, t_pad, i_pad)
      h = self.mlm_norm(F.gelu(self.mlm_dense(txt)))
      logits = h @ self.bert.embeddings.word_embeddings.weight.t() + self.mlm_bias
      y = self.dec_embed(img[:, 1:])
      y = torch.where(patch_mask[..., None], self.mask_token.expand_as(y), y) + self.dec_pos
      pred = self.dec_pred(self.dec_norm(self.dec_blocks(y)))
      return logits, pred, v, u

  model = Mixed().train()
  opt = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
  gray = torch.from_numpy(batch_np["image"]).permute(0, 3, 1, 2)
  ids = torch.from_numpy(batch_np["input_ids"]).long()
  att = torch.from_numpy(batch_np["attention_mask"]).long()
  n = ids.shape[0]
  tm, im, lc = m.masking.text, m.masking.image, cfg.loss

  def masks():
    special = torch.isin(ids, torch.tensor(tm.special_token_ids))
    sel = (att > 0) & ~special & (torch.rand(ids.shape) < tm.prob)
    u = torch.rand(ids.shape)
    corrupted = torch.where(sel & (u < tm.mask_frac), tm.mask_token_id, ids)
    rand = sel & (u >= tm.mask_frac) & (u < tm.mask_frac + tm.random_frac)
    corrupted = torch.where(rand, torch.randint(0, vocab, ids.shape), corrupted)
    scale_id = (torch.arange(n) + int(torch.randint(0, len(im.scales), ()))) % len(im.scales)
    per_scale = []
    for b, r in zip(im.scales, im.ratios):
      nb = math.ceil(grid / b)
      ranks = torch.rand(n, nb * nb).argsort(1).argsort(1)
      blk = (ranks < round(r * nb * nb)).view(n, nb, nb)
      blk = blk.repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :grid, :grid]
      per_scale.append(blk.reshape(n, -1))
    patch_mask = torch.stack(per_scale)[scale_id, torch.arange(n)]
    return corrupted, sel, patch_mask, scale_id

  def train_step():
    corrupted, sel, patch_mask, scale_id = masks()
    x = (gray.float() / 255).expand(-1, 3, -1, -1)
    x = (x - 0.5) / 0.5
    logits, pred, v, u = model(x, corrupted, att, patch_mask)
    mlm = F.cross_entropy(logits[sel], ids[sel])
    target = F.unfold(gray.float() / 255, p, stride=p).transpose(1, 2)  # [N, P, p*p]
    target = (target - target.mean(-1, keepdim=True)) / (
      target.var(-1, unbiased=False, keepdim=True) + 1e-6
    ).sqrt()
    err = ((pred - target) ** 2).mean(-1)
    mvm = sum(
      w * err[patch_mask & (scale_id == k)[:, None]].mean()
      for k, w in enumerate(lc.mvm_scale_weights)
    )
    v, u = F.normalize(v, dim=-1), F.normalize(u, dim=-1)
    sim = v @ u.t() / lc.temperature
    tgt = torch.arange(n)
    con = lc.lam * F.cross_entropy(sim, tgt) + (1 - lc.lam) * F.cross_entropy(sim.t(), tgt)
    loss = lc.mlm_weight * mlm + lc.mvm_weight * mvm + lc.contrastive_weight * con
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())

  warm, times, cpu, loss = _time(train_step, steps)
  n_params = sum(q.numel() for q in model.parameters()) / 1e6
  return {
    "impl": "torch",
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "params_M": round(n_params, 1),
    "warmup_s": round(warm, 1),
    "s_per_step_median": round(float(np.median(times)), 3),
    "s_per_step_min": round(min(times), 3),
    "times": [round(t, 3) for t in times],
    "cpu_s_per_step": round(float(np.median(cpu)), 3),
    "loss": loss,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--only", choices=("jax", "torch"), default=None)
  args = ap.parse_args()
  cfg = _config()
  batch = _inputs(args.batch, cfg.model.image.image_size, cfg.data.max_length)
  head = {"device": "cpu", "batch": args.batch, "max_length": cfg.data.max_length}
  if args.only in (None, "jax"):
    r = bench_jax(cfg, batch, args.steps)
    r.pop("_profile", None)
    print(json.dumps({**head, **r}), flush=True)
  if args.only in (None, "torch"):
    print(json.dumps({**head, **bench_torch(cfg, batch, args.steps)}), flush=True)


if __name__ == "__main__":
  main()
