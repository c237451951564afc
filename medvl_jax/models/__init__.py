"""Pure flax.linen encoders and heads. A model is chosen by `config.model.name` through its
family (`medvl_jax.families`), which knows how to build it."""
