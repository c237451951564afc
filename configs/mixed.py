"""Mixed-data masked pretraining (Wang et al. 2021, docs/METHODS.md): paired + unpaired data.

  python -m medvl_jax.main --config=configs/mixed.py                # paired + NIH + IU
  python -m medvl_jax.main --config=configs/mixed.py:paired_only
  python -m medvl_jax.main --config=configs/mixed.py:unpaired       # NIH images + IU reports
  python -m medvl_jax.main --config=configs/mixed.py:smoke          # tiny, for tests
  python -m medvl_jax.main --config=configs/mixed.py:large          # ViT-L + BERT-large, FSDP

The paper's layer sizes, mask ratios, scales, decoder and loss weights are unpublished, so every
value below is our choice, justified against the closest public designs:
  m3ae (Geng et al. 2022): one fused stream, 75% image masks, 8x512 MAE decoder, MLM weight
    0.1-0.5 relative to the pixel loss;
  MRM (Zhou et al. 2023, CXR): ViT-B/16, per-patch-normalised pixel targets, 4x768 decoder,
    MLM and MIM losses 1:1;
  M3AE-medical (Chen et al. 2022): co-attention fusion over separate stacks, 15% whole-word MLM;
  TransCheX (MONAI, the paper group's public relative): separate language and vision stacks,
    then mixed layers where text attends to image; BERT-base widths.
"""

import importlib.util
import pathlib

import ml_collections


def _convirt_module():
  """configs/convirt.py (loaded by path: configs/ is not a package)."""
  path = pathlib.Path(__file__).with_name("convirt.py")
  spec = importlib.util.spec_from_file_location("_medvl_convirt_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  convirt = _convirt_module()
  c = convirt.get_config()  # Shared run, data, optimiser and sharding settings.
  c.batch_size = 16  # MRM/m3ae use 128-4096 on accelerators; 16 fits a 2-core CPU.
  # ~15 min on 2 CPU cores at full size (ViT-B/16 + MiniLM, measured 23.4 s/step at batch 16,
  # compile 22 s; bench/RESULTS.md): enough to show the three losses move, not to converge.
  c.total_steps = 32
  c.eval_every = 16
  c.checkpoint_every = 16

  # --- Data: three kinds of sources in one stream (the format: docs/corpora.md) -------------
  c.data.name = "cxr_sample"
  c.data.builder_config = "paired"
  c.data.image_size = ml_collections.FieldReference(224)
  c.data.sources = (
    # Weights ~ how much each kind teaches per row: paired rows drive all three losses, so
    # they get half the batch; the unpaired kinds split the rest.
    dict(name="cxr_sample", builder_config="paired", split="train", kind="paired", weight=0.5),
    dict(
      name="cxr_sample", builder_config="image_only", split="train", kind="image", weight=0.25
    ),  # nih14_sample: another institute's images
    dict(
      name="cxr_sample", builder_config="text_only", split="train", kind="text", weight=0.25
    ),  # iu_reports: a third institute's reports
  )

  # --- Model ---------------------------------------------------------------------------------
  c.model.name = "mixed"
  c.model.projection_dim = 512  # ConVIRT's d (heads 768->512->512); same evaluators apply.
  c.model.projection_hidden = 512
  c.model.image = ml_collections.ConfigDict(
    dict(
      # ViT-B/16 as MRM; 224 / 16 = a 14x14 grid (TransCheX used 32px patches at 256: coarser).
      image_size=c.data.get_ref("image_size"),
      patch_size=16,
      hidden_size=768,
      num_layers=12,
      num_heads=12,
      mlp_ratio=4.0,
      # Grey repeated to 3 channels: ImageNet ViT weights (timm) load unchanged and the export
      # is a stock timm model; the cost is one conv over 3 identical planes.
      in_chans=3,
      mean=(0.5, 0.5, 0.5),
      std=(0.5, 0.5, 0.5),  # timm vit_*_augreg normalisation
      dropout=0.0,
      attention_dropout=0.0,  # MAE/MRM pretrain ViTs without dropout
      pool="cls",  # h_v = class token (timm global_pool='token')
      init="",  # local timm ViT state dict file, or ''
    )
  )
  # Text: the same BERT stack and local HF checkpoint as ConVIRT (model.text from convirt.py:
  # init, tokenizer, dropouts, shape used when init is ''); all layers train (masked pretraining
  # updates the text stack, unlike ConVIRT's half-frozen BERT).
  c.model.text.frozen_layers = 0
  c.model.text.freeze_embeddings = False
  c.model.text.pool = "max"  # ConVIRT's pooling, so text evaluators treat both families alike
  c.model.fusion = ml_collections.ConfigDict(
    dict(
      # Co-attention (M3AE-medical, LXMERT/TransCheX mixed layers): text attends to image and
      # image to text, each then self-attention + MLP. Two layers as TransCheX's mixed stack;
      # m3ae's single fused stream would need equal widths (ViT 768 vs MiniLM 384 here).
      num_layers=2,
      num_heads=12,
      mlp_ratio=4.0,
      dropout=0.1,
    )
  )
  c.model.decoder = ml_collections.ConfigDict(
    dict(
      # Light MAE-style decoder: 4 blocks (MRM's depth) at m3ae/MAE's 512 width (MRM 768).
      hidden_size=512,
      num_layers=4,
      num_heads=16,
      mlp_ratio=4.0,
      norm_pix_target=True,  # per-patch-normalised pixel targets (MAE, MRM)
    )
  )
  c.model.masking = ml_collections.ConfigDict()
  c.model.masking.text = ml_collections.ConfigDict(
    dict(
      # BERT / M3AE-medical: 15%, 80% [MASK] / 10% random / 10% kept. Token-level, not
      # whole-word: the batch carries no word ids.
      prob=0.15,
      mask_frac=0.8,
      random_frac=0.1,
      # Ids of the bundled MiniLM (uncased BERT) vocabulary: [MASK]; [PAD] [UNK] [CLS] [SEP]
      # [MASK] are never targets. Change with text.init/tokenizer.
      mask_token_id=103,
      special_token_ids=(0, 100, 101, 102, 103),
      # Vocabulary logits only at the first K selected positions of each row (0 = at every
      # position): BERT's max_predictions_per_seq.
      max_predictions=0,
    )
  )
  c.model.masking.image = ml_collections.ConfigDict(
    dict(
      # Multi-scale blocks of 1x1, 2x2, 4x4 patches (docs/METHODS.md), one scale per row each
      # step, balanced within the batch. 1x1 at 75% as MAE/m3ae/MRM; 2x2 (32px blocks) at 60% as
      # SimMIM's 32px blocks; 4x4 (64px) at 50%: coarse blocks already remove whole
      # structures, so less is masked to leave context.
      scales=(1, 2, 4),
      ratios=(0.75, 0.6, 0.5),
    )
  )

  c.loss = ml_collections.ConfigDict(
    dict(
      name="mixed",
      mvm_weight=1.0,
      mlm_weight=0.5,  # m3ae's range 0.1-0.5 (upper end: reports are short) ; MRM 1
      contrastive_weight=1.0,  # FLIP-style on the masked inputs of paired rows
      mvm_scale_weights=(1 / 3, 1 / 3, 1 / 3),  # equal: no scale is known to matter more
      lam=0.75,
      temperature=0.1,  # ConVIRT's InfoNCE
      # N x N layout (medvl_jax.losses.contrastive): 'gather' = local rows x all-gathered
      # columns per device, 'ring' = blocks passed around, 'dense' = one N x N matrix; all
      # the same loss, and on one device all are 'dense'.
      impl="gather",
    )
  )
  c.optimizer.lr = 1e-4  # ConVIRT's Adam lr (MRM: AdamW 1.5e-4 x batch/256)

  if arg == "paired_only":
    c.data.sources = (
      dict(name="cxr_sample", builder_config="paired", split="train", kind="paired", weight=1.0),
    )
  elif arg == "unpaired":
    c.data.sources = (
      dict(name="cxr_sample", builder_config="image_only", split="train", kind="image", weight=0.5),
      dict(name="cxr_sample", builder_config="text_only", split="train", kind="text", weight=0.5),
    )
    c.loss.contrastive_weight = 0.0  # no pairs: the term is always zero anyway
  elif arg == "smoke":
    c.batch_size = 8
    c.total_steps = 40
    c.log_every = 1
    c.eval_every = 10
    c.checkpoint_every = 10
    c.data.image_size = 64
    c.data.resize = 72
    c.data.max_length = 32
    c.model.projection_dim = 32
    c.model.projection_hidden = 32
    c.model.image.update(patch_size=8, hidden_size=32, num_layers=2, num_heads=2)
    c.model.text.tokenizer = c.model.text.init  # real MiniLM vocab, random tiny BERT
    c.model.text.init = ""
    c.model.text.update(
      vocab_size=30522,
      hidden_size=32,
      num_layers=2,
      num_heads=2,
      intermediate_size=64,
      max_position_embeddings=64,
    )
    c.model.fusion.update(num_layers=1, num_heads=2)
    c.model.decoder.update(hidden_size=32, num_layers=1, num_heads=2)
    # Scales (1, 2, 4) on the 8x8 grid of 8px patches.
    c.optimizer.lr = 1e-3
  elif arg == "small":
    # The study's small size (docs/study.md), the same image side, tokens, batch and length
    # as ConVIRT's (configs/convirt.py SMALL): a ViT-Ti-like image stack (width 192, 4 layers)
    # on 16 px patches (an 8x8 grid, so the 1/2/4-patch mask scales tile it), the bundled
    # MiniLM's first 2 layers (all trained), one fusion layer and a 2-block decoder.
    convirt.apply_small(c)
    c.model.image.update(patch_size=16, hidden_size=192, num_layers=4, num_heads=3)
    c.model.text.init_layers = 2
    c.model.fusion.update(num_layers=1, num_heads=6)
    c.model.decoder.update(hidden_size=128, num_layers=2, num_heads=4)
    # Logits at 12 of the 32 positions: the head was most of the step; a row selects more
    # than 12 of its ~30 candidates at 15% with probability 0.02% (binomial).
    c.model.masking.text.max_predictions = 12
    c.optimizer.lr = convirt.SMALL["mixed_lr"]
  elif arg == "large":
    # ViT-L/16 + BERT-large widths (random init unless model.*.init name local checkpoints; the
    # MiniLM vocabulary): FSDP over every device, params and Adam state sharded over 'fsdp'.
    c.model.image.update(hidden_size=1024, num_layers=24, num_heads=16)
    c.model.text.tokenizer = c.model.text.init
    c.model.text.init = ""
    c.model.text.update(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    c.model.fusion.update(num_heads=16)
    c.mesh = (("data", 1), ("fsdp", -1), ("model", 1))
    c.sharding.rules = ((".*", "fsdp"),)  # medvl_jax.parallel.sharding.FSDP_RULES
  elif arg:
    raise ValueError(
      f"configs/mixed.py: unknown variant {arg!r}; valid: 'paired_only', "
      "'unpaired', 'small', 'smoke', 'large' or none"
    )
  return c
