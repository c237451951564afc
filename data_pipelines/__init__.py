"""tfds builders and the prepare CLI for the corpora medvl_jax trains on."""

import medvl_jax  # noqa: F401  # Sets TensorFlow's C++ log threshold before tfds imports TF.
