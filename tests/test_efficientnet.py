"""EfficientNet-Lite0: ImageNet top-1 and features of the Flickr8k sample photos.

The shipped features (`f8k_effnetlite0_*`) were computed from the same photos with the same
weights; ours must match them to float16 precision.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from aeir_jax.errors import DataError
from aeir_jax.models.efficientnet import grid_regions, load_efficientnet_lite0, preprocess

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'flickr8k'


@pytest.fixture(scope='module')
def model():
  try:
    return load_efficientnet_lite0()
  except DataError as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def samples(model):
  """Runs the model once on the 8 sample photos; returns (outputs, shipped rows)."""
  if not (DATA / 'samples').is_dir():
    pytest.skip(f'Flickr8k data not found at {DATA}')
  files = sorted((DATA / 'samples').glob('*.jpg'))
  names = (DATA / 'f8k_image_names.txt').read_text().splitlines()
  rows = [names.index(f.name) for f in files]
  module, variables = model
  images = np.stack([preprocess(Image.open(f)) for f in files])
  out = jax.tree.map(np.asarray, jax.jit(module.apply)(variables, images))
  return out, rows


def _shipped(name, rows):
  return np.load(DATA / name, mmap_mode='r')[rows].astype(np.float32)


def test_shapes(model):
  module, variables = model
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  out = jax.eval_shape(module.apply, variables, images)
  assert out['logits'].shape == (1, 1000)
  assert out['pooled'].shape == (1, 1280)
  assert out['feature_map'].shape == (1, 7, 7, 1280)
  for grid, regions in (('2x2', 4), ('7x7', 49)):
    shape = jax.eval_shape(lambda f: grid_regions(f, grid), out['feature_map']).shape
    assert shape == (1, regions, 1280)
  n_params = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert n_params == 4_652_008  # 4.69 M minus the batch-norm running statistics.


def test_top1_matches_shipped(samples):
  out, rows = samples
  top1 = np.load(DATA / 'f8k_effnetlite0_top1_imagenet.npy')[rows]
  np.testing.assert_array_equal(out['logits'].argmax(1), top1)


def test_features_match_shipped_fp16(samples):
  out, rows = samples
  np.testing.assert_allclose(out['pooled'], _shipped('f8k_effnetlite0_pooled_fp16.npy', rows),
                             rtol=2e-3, atol=2e-3)
  grid = np.asarray(grid_regions(out['feature_map'], '2x2'))
  np.testing.assert_allclose(grid, _shipped('f8k_effnetlite0_grid2x2_fp16.npy', rows),
                             rtol=2e-3, atol=2e-3)


def test_grid_regions_definition():
  fmap = np.arange(2 * 7 * 7 * 3, dtype=np.float32).reshape(2, 7, 7, 3)
  got = np.asarray(grid_regions(fmap, '2x2'))
  want = [fmap[:, r0:r0 + 4, c0:c0 + 4].mean((1, 2)) for r0 in (0, 3) for c0 in (0, 3)]
  np.testing.assert_allclose(got, np.stack(want, 1))
  np.testing.assert_array_equal(grid_regions(fmap, '7x7')[:, 8], fmap[:, 1, 1])


def test_preprocess():
  image = Image.new('RGB', (300, 200), (255, 0, 128))
  x = preprocess(image.convert('L').convert('RGBA'))
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  y = preprocess(image)
  np.testing.assert_allclose(y[0, 0], (np.array([1.0, 0.0, 128 / 255]) - [0.485, 0.456, 0.406])
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
