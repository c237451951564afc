"""The one rule that maps flax leaf paths to PyTorch state-dict names, and state-dict files.

A flax leaf path maps to a PyTorch name by joining the module path with '.' and renaming the leaf
(`kernel`/`embedding`/`scale` -> `weight`, `bias` -> `bias`, BatchNorm `mean`/`var` ->
`running_mean`/`running_var`); conv kernels are HWIO in flax and OIHW in torch, dense kernels
(in, out) in flax and (out, in) in torch. Used both ways: import and export.
"""

from collections.abc import Mapping
import os
import pathlib
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from medvl_jax.errors import WeightsError

_LEAF_TO_TORCH = {
  "kernel": "weight",
  "embedding": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
_MAX_NAMED = 5  # How many offending names an error message lists.


def torch_name(path: tuple[str, ...]) -> str:
  """('layer1', '0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
  *modules, leaf = path
  if leaf not in _LEAF_TO_TORCH:
    raise WeightsError(f"no PyTorch name for flax leaf {'/'.join(path)}")
  return ".".join([*modules, _LEAF_TO_TORCH[leaf]])


def leaf_to_torch(leaf: str, value: Any) -> np.ndarray:
  """Converts one flax leaf (named `leaf`) to the PyTorch layout."""
  value = np.asarray(value)
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def leaf_from_torch(leaf: str, value: Any) -> np.ndarray:
  """Inverse of `leaf_to_torch`."""
  value = np.asarray(value)
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return leaf_to_torch(leaf, np.empty(shape, np.uint8)).shape


def to_torch(*trees: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens flax trees (e.g. params and batch_stats) into one PyTorch-style state dict."""
  out = {}
  for tree in trees:
    for path, value in flatten(tree).items():
      out[torch_name(path)] = leaf_to_torch(path[-1], value)
  return out


def from_torch(
  state_dict: Mapping[str, np.ndarray], targets: Mapping[str, Mapping[str, Any]], source: str
) -> dict[str, dict[str, Any]]:
  """Fills flax trees shaped like `targets` ({collection: tree}) from a PyTorch state dict.

  Args:
    state_dict: name -> array, already stripped of prefixes and ignored entries.
    targets: collection name -> flax tree of arrays or `jax.ShapeDtypeStruct`s (shapes only).
    source: what to name in error messages (the checkpoint path).

  Returns:
    collection name -> flax tree of float32 NumPy arrays.

  Raises:
    WeightsError: names missing or unexpected keys, or keys whose shapes differ.
  """
  wanted = {}  # torch name -> (collection, flax path, flax shape)
  for collection, tree in targets.items():
    for path, leaf in flatten(tree).items():
      wanted[torch_name(path)] = (collection, path, tuple(leaf.shape))
  missing = [k for k in wanted if k not in state_dict]
  unexpected = [k for k in state_dict if k not in wanted]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {names(missing)}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {names(unexpected)}")
    raise WeightsError(f"{source}: checkpoint does not match the model: {'; '.join(parts)}")
  bad = []
  for name, (_, path, shape) in wanted.items():
    want = _torch_shape(path[-1], shape)
    got = tuple(np.shape(state_dict[name]))
    if got != want:
      bad.append(f"{name} checkpoint {got} vs model {want}")
  if bad:
    raise WeightsError(f"{source}: shape mismatch for {len(bad)} keys: {names(bad)}")
  flat: dict[str, dict[tuple[str, ...], Any]] = {c: {} for c in targets}
  for name, (collection, path, _) in wanted.items():
    value = leaf_from_torch(path[-1], state_dict[name]).astype(np.float32)
    flat[collection][path] = value
  return {c: unflatten(f) for c, f in flat.items()}


def names(items: list[str]) -> str:
  more = f", ... (+{len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else ""
  return ", ".join(items[:_MAX_NAMED]) + more


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat name -> array dict from `.safetensors` or a torch pickle (weights_only)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: checkpoint file not found")
  if path.suffix == ".safetensors":
    try:
      return dict(safetensors.numpy.load_file(str(path)))
    except Exception as e:  # pylint: disable=broad-except
      raise WeightsError(f"{path}: cannot read checkpoint: {type(e).__name__}: {e}") from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(f"{path}: reading a PyTorch pickle needs torch installed") from e
  try:
    tensors = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"{path}: cannot read checkpoint: {type(e).__name__}: {e}") from e
  if not isinstance(tensors, Mapping):
    raise WeightsError(f"{path}: expected a state dict, found {type(tensors).__name__}")
  out = {}
  for name, t in tensors.items():
    if not isinstance(t, torch.Tensor):
      raise WeightsError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().cpu()
    out[name] = (t.float() if t.is_floating_point() else t).numpy()
  return out
