"""The ResNet's conv-as-matmul path (`conv_impl='dot'`, `DotConv`) against `flax.linen.Conv`.

Both compute the same sums in another order, in float32: outputs and gradients agree to
float32 rounding (stated tolerances below), and the parameters are the same tree and values.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.errors import ConfigError
from medvl_jax.models import resnet

# rtol/atol on unit-scale data: a few float32 ulps times sqrt(k*k*in) terms.
RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.parametrize(
  "cls,kernel,stride,size",
  [
    ("DotConv", 1, 1, 5),
    ("DotConv", 1, 2, 7),
    ("DotConv", 3, 1, 6),
    ("DotConv", 3, 2, 7),
    ("DotConv", 7, 2, 8),
    ("TapConv", 3, 1, 6),
    ("TapConv", 3, 2, 7),
    ("TapConv", 3, 2, 8),
    ("TapConv", 7, 2, 9),
  ],
)
def test_dot_conv_equals_nn_conv_and_its_gradients(cls, kernel, stride, size):
  rng = np.random.default_rng(kernel * 100 + stride * 10 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  # The ResNet's constructor (torch's padding and initialiser) against DotConv (for k > 1
  # the im2col path, which bench/conv_variants.py times) and TapConv (XLA's conv, weight
  # gradient by per-tap dots: the library's 3x3s under conv_impl='dot').
  plain = resnet._conv(4, kernel, stride, "conv", jnp.float32, "xla")  # pylint: disable=protected-access
  dot = getattr(resnet, cls)(4, kernel, stride, name="conv")
  assert isinstance(plain, nn.Conv)
  lib = resnet._conv(4, kernel, stride, "c", jnp.float32, "dot")  # pylint: disable=protected-access
  expected = {1: resnet.DotConv, 3: resnet.TapConv, 7: nn.Conv}[kernel]
  assert type(lib) is expected  # pylint: disable=unidiomatic-typecheck
  params = plain.init(jax.random.key(0), x)
  # Same parameter tree, and the same initial values from the same key.
  dot_params = dot.init(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(dot_params)
  np.testing.assert_array_equal(params["params"]["kernel"], dot_params["params"]["kernel"])

  out = -(-size // stride)
  cot = jnp.asarray(rng.normal(size=(2, out, out, 4)), jnp.float32)

  @jax.jit
  def run(params, x):
    def both(module):
      y = module.apply(params, x)
      return y, jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * cot), argnums=(0, 1))(params, x)

    return both(plain), both(dot)

  (y_plain, (gp_plain, gx_plain)), (y_dot, (gp_dot, gx_dot)) = run(params, x)
  assert y_plain.shape == y_dot.shape == (2, out, out, 4)
  np.testing.assert_allclose(y_dot, y_plain, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(gx_dot, gx_plain, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
    gp_dot["params"]["kernel"], gp_plain["params"]["kernel"], rtol=RTOL, atol=1e-4
  )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_channel_dot_value_and_gradients_match_numpy(dtype):
  # The 1x1 conv's custom backward (x transposed for the weight gradient) against the
  # textbook formulas in float64 NumPy: y = x w, dx = g w^T, dw = sum over pixels x^T g.
  rng = np.random.default_rng(7)
  x64, w64 = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(4, 6))
  g64 = rng.normal(size=(2, 3, 5, 6))
  x, w, g = (jnp.asarray(a, dtype) for a in (x64, w64, g64))
  y, vjp = jax.vjp(resnet.channel_dot, x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.dtype(dtype)
  assert dx.shape == x.shape and dw.shape == w.shape
  # Against the inputs as rounded to `dtype`, so only the arithmetic's rounding remains:
  # float32 ~1e-6 relative; bfloat16 (8-bit mantissa, results rounded to bf16) ~1e-2.
  xr, wr, gr = (np.asarray(a, np.float64) for a in (x, w, g))
  tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
  np.testing.assert_allclose(np.asarray(y, np.float64), xr @ wr, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), gr @ wr.T, rtol=tol, atol=tol)
  dw_ref = xr.reshape(-1, 4).T @ gr.reshape(-1, 6)
  np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=tol, atol=tol * 4)


def _tiny_pair():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  xla, dot = resnet.ResNetTiny(conv_impl="xla"), resnet.ResNetTiny(conv_impl="dot")
  variables = xla.init(jax.random.key(0), x, train=False)
  dot_vars = dot.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(dot_vars)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(dot_vars)):
    np.testing.assert_array_equal(a, b)
  return x, xla, dot, variables


@pytest.mark.slow  # two ResNet compiles: ~24 s
def test_resnet_tiny_dot_equals_xla_in_eval():
  x, xla, dot, variables = _tiny_pair()
  e_xla, e_dot = jax.jit(lambda v: [m.apply(v, x, train=False) for m in (xla, dot)])(variables)
  np.testing.assert_allclose(e_dot, e_xla, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two ResNet train-step compiles: ~20 s on 2 idle cores
def test_resnet_tiny_dot_equals_xla_in_train():
  x, xla, dot, variables = _tiny_pair()

  def train_loss(module, params):
    out, upd = module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable="batch_stats",
    )
    return jnp.mean(jnp.square(out)), upd["batch_stats"]

  @jax.jit
  def run(variables):
    return [
      jax.value_and_grad(lambda p, m=m: train_loss(m, p), has_aux=True)(variables["params"])
      for m in (xla, dot)
    ]

  ((l_xla, s_xla), g_xla), ((l_dot, s_dot), g_dot) = run(variables)
  # Train-mode BatchNorm divides by batch standard deviations, which amplifies rounding
  # differences a little: 1e-4 relative.
  np.testing.assert_allclose(l_dot, l_xla, rtol=1e-4)
  for a, b in zip(jax.tree.leaves((s_dot, g_dot)), jax.tree.leaves((s_xla, g_xla))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_unknown_conv_impl_is_refused():
  x = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="conv_impl: unknown 'fft'"):
    resnet.ResNetTiny(conv_impl="fft").init(jax.random.key(0), x, train=False)


def test_config_refuses_unknown_conv_impl():
  from configs import convirt as convirt_config  # pylint: disable=g-import-not-at-top
  from medvl_jax.models import convirt  # pylint: disable=g-import-not-at-top

  cfg = convirt_config.get_config("smoke")
  cfg.model.image.conv_impl = "fft"
  with pytest.raises(ConfigError, match="model.image.conv_impl: unknown 'fft'"):
    convirt.from_config(cfg.model)
