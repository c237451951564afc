"""ResNet v1.5 (torchvision layout) returning globally average-pooled features.

Submodule names follow torchvision's state-dict names (`conv1`, `bn1`, `layer1/0/conv2`,
`layer1/0/downsample/0`, ...) so that `medvl_jax.interop` maps the two one-to-one.

`conv_impl` picks how the convolutions are computed; all have the same parameters (one
`kernel` [kh, kw, in, out] per conv, the same initialiser), so checkpoints and the torchvision
import/export are shared:
  'xla': `flax.linen.Conv` (XLA's convolution op) for every conv;
  'dot': the 1x1 convs (36 of ResNet-50's 53, ~half its FLOPs) as one dot over the channels
    (strided ones on the subsampled input); the 3x3s as XLA convolutions whose weight gradient
    is one dot per kernel tap (`tap_conv`); the 7x7 stem an XLA convolution. The same sums
    in another order. On CPU XLA's dot is faster than its 1x1 convolution, and
    `channel_dot`'s backward (the weight gradient from x transposed) faster again;
    computing the 3x3s and the stem as dots too (`DotConv`'s im2col) measured slower and keeps
    a k*k-times larger activation per conv for the backward pass (bench/RESULTS.md, 2026-12-02);
  'auto' (the default): 'dot' when JAX's default backend is the CPU, else 'xla' (cuDNN's and
    TPU's convolutions; the dot path is not measured there).
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


CONV_IMPLS = ("auto", "xla", "dot")


@jax.custom_vjp
def channel_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out]: a 1x1 conv, with a backward pass laid out for XLA's CPU dot.

  The weight gradient sum_m x[m, i] g[m, j] contracts the leading (pixel) axis of both
  operands. Left to itself XLA's CPU backend materialises g transposed, fused into the
  BatchNorm backward that produces g, i.e. a strided write of the largest tensor; here x is
  transposed explicitly and g is used as it is. Same sums (the order of the additions may
  differ); measured in bench/conv_variants.py (bench/RESULTS.md, 2026-12-06).
  """
  return jnp.dot(x, w)


def _channel_dot_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _channel_dot_bwd(res, g):
  x, w = res
  dx = jnp.dot(g, w.T)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
  return dx, dw.astype(w.dtype)


channel_dot.defvjp(_channel_dot_fwd, _channel_dot_bwd)


def _conv_same(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  pad = w.shape[0] // 2
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tap_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  """k x k conv (zero padding k // 2) whose weight gradient is k*k dots, one per kernel tap.

  Forward and input gradient are XLA's convolutions. XLA's CPU weight gradient is a
  convolution over the whole feature map with the batch as its channel axis, for which it
  transposes x (channels first, batch last) and runs slowly at large maps; here tap (i, j)
  of the gradient is g^T @ x shifted by (i, j): one transpose of g and k*k plain dots on
  slices of the padded x. Same sums, other order. Measured on the ResNet-50 step with the
  3x3s (bench/RESULTS.md, 2026-12-06); the 7x7 stem (3 input channels) measured slower so.
  """
  return _conv_same(x, w, stride)


def _tap_conv_fwd(x, w, stride):
  return _conv_same(x, w, stride), (x, w)


def _tap_conv_bwd(stride, res, g):
  x, w = res
  k, s = w.shape[0], stride
  pad = k // 2
  dx = jax.vjp(lambda x: _conv_same(x, w, s), x)[1](g)[0]
  n, ho, wo, out = g.shape
  c = x.shape[-1]
  gt = g.reshape(-1, out).T
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # Output pixel (a, b) sees input pixel (s*a + i, s*b + j) through tap (i, j).
  taps = [
    gt
    @ jax.lax.slice(
      xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1)
    ).reshape(-1, c)
    for i in range(k)
    for j in range(k)
  ]
  dw = jnp.stack(taps).reshape(k, k, out, c).transpose(0, 1, 3, 2)
  return dx, dw.astype(w.dtype)


tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)


class DotConv(nn.Module):
  """Bias-free k x k conv, stride s, zero padding k // 2, computed as one matrix product.

  k = 1: a dot over the channels of the (subsampled) input. k > 1: im2col, i.e. the k*k
  shifted, strided windows concatenated on the channel axis, then one dot with the kernel
  reshaped to [k*k*in, out] (the ResNet uses k > 1 only in bench/conv_variants.py).

  Parameters as `nn.Conv(features, (k, k), use_bias=False)`: {'kernel': [k, k, in, out]}.
  """

  features: int
  kernel: int
  stride: int = 1
  dtype: Any = jnp.float32

  def _kernel_and_input(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The conv's one parameter (named, shaped and initialised as nn.Conv's), both in dtype."""
    k = self.kernel
    w = self.param("kernel", _CONV_INIT, (k, k, x.shape[-1], self.features), jnp.float32)
    return jnp.asarray(x, self.dtype), jnp.asarray(w, self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel, self.stride
    x, w = self._kernel_and_input(x)
    if k == 1:
      cols = x[:, ::s, ::s, :] if s > 1 else x
      return channel_dot(cols, w.reshape(-1, self.features))
    pad = k // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, wd, c = x.shape
    ho, wo = (h - k) // s + 1, (wd - k) // s + 1
    # Window (i, j) of output pixel (a, b) is input pixel (s*a + i, s*b + j); concatenated in
    # (i, j, channel) order, the order of the kernel's flattened [k, k, in] axes.
    cols = jnp.concatenate(
      [
        jax.lax.slice(
          x, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1)
        )
        for i in range(k)
        for j in range(k)
      ],
      axis=-1,
    )
    return jnp.dot(cols, w.reshape(-1, self.features))


class TapConv(DotConv):
  """Bias-free k x k conv, stride s, padding k // 2, by `tap_conv` (parameters as `DotConv`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, w = self._kernel_and_input(x)
    return tap_conv(x, w, self.stride)


def _conv(
  features: int, kernel: int, stride: int, name: str, dtype: Any, impl: str = "auto"
) -> nn.Module:
  """Bias-free conv with torch's explicit symmetric zero padding of kernel // 2."""
  if impl == "auto":
    impl = "dot" if jax.default_backend() == "cpu" else "xla"
  if impl == "dot" and kernel == 1:
    return DotConv(features, kernel, stride, dtype, name=name)
  if impl == "dot" and kernel == 3:
    return TapConv(features, kernel, stride, dtype, name=name)
  if impl not in ("xla", "dot"):
    raise ValueError(f"conv_impl: unknown {impl!r}; valid: {', '.join(CONV_IMPLS)}")
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=_CONV_INIT,
    dtype=dtype,
    name=name,
  )


def _norm(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
  """BatchNorm with torch's defaults (eps 1e-5, torch momentum 0.1 == flax momentum 0.9)."""
  return nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


class Downsample(nn.Module):
  """Projection shortcut: 1x1 strided conv (`0`) then BatchNorm (`1`)."""

  features: int
  stride: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self.features, 1, self.stride, "0", self.dtype, self.conv_impl)(x)
    return _norm(train, "1", self.dtype)(x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (4x wider), identity/projection skip."""

  width: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv(self.width, 1, 1, "conv1", self.dtype, self.conv_impl)(x)
    y = nn.relu(_norm(train, "bn1", self.dtype)(y))
    y = _conv(self.width, 3, self.stride, "conv2", self.dtype, self.conv_impl)(y)
    y = nn.relu(_norm(train, "bn2", self.dtype)(y))
    y = _conv(4 * self.width, 1, 1, "conv3", self.dtype, self.conv_impl)(y)
    y = _norm(train, "bn3", self.dtype)(y)
    if self.downsample:
      x = Downsample(4 * self.width, self.stride, self.dtype, self.conv_impl, name="downsample")(
        x, train
      )
    return nn.relu(x + y)


class Stage(nn.Module):
  """One `layerK` of torchvision: blocks named '0', '1', ...; the first one may downsample."""

  num_blocks: int
  width: int
  stride: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      first = i == 0
      needs_proj = first and (self.stride != 1 or x.shape[-1] != 4 * self.width)
      x = Bottleneck(
        self.width,
        self.stride if first else 1,
        needs_proj,
        self.dtype,
        self.conv_impl,
        name=str(i),
      )(x, train)
    return x


class ResNet(nn.Module):
  """ResNet v1.5 backbone without the classifier.

  Attributes:
    stage_sizes: number of bottleneck blocks in each of the four stages.
    width: bottleneck width of the first stage (64 for ResNet-50); doubles per stage.
    dtype: computation dtype (parameters stay float32).
    conv_impl: 'auto' | 'xla' | 'dot' (module docstring); the same parameters and function.
  """

  stage_sizes: Sequence[int]
  width: int = 64
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps normalised images [N, H, W, 3] to pooled features [N, 4 * 2**(S-1) * width]."""
    x = jnp.asarray(x, self.dtype)
    x = _conv(self.width, 7, 2, "conv1", self.dtype, self.conv_impl)(x)
    x = nn.relu(_norm(train, "bn1", self.dtype)(x))
    # Max pooling pads with -inf, like torch.nn.MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      x = Stage(
        num_blocks,
        self.width * 2**i,
        1 if i == 0 else 2,
        self.dtype,
        self.conv_impl,
        name=f"layer{i + 1}",
      )(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)
# The study's `small` size: two blocks per stage at a quarter of ResNet-50's width (512-d features).
ResNetSmall = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), width=16)
