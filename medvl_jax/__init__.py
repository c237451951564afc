"""medvl_jax: image–text pretraining for chest X-rays in JAX/Flax (ConVIRT, mixed-data masked)."""

import os

# TensorFlow (tfds, and the augmentations' TF ops) is configured before it is first imported,
# by anything: its C++ reads these at import time, before any CLI's set-up runs.
# - TF_ENABLE_ONEDNN_OPTS=0: on CPUs where TF enables oneDNN by default, its ops (the blur's
#   conv2d, resizes) round differently from the same ops on other CPUs; off, a pod's hosts and a
#   rerun on another machine augment alike. It also drops the notice that TF prints about it
#   at import (with absl's "before InitializeLog" warning), which TF_CPP_MIN_LOG_LEVEL does
#   not silence.
# - TF_CPP_MIN_LOG_LEVEL=2: TF's other C++ info and warning lines.
# A user's own setting of either wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
