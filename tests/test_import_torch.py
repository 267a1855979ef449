"""Importing SGRAF/AECR PyTorch checkpoints: exact reference names, numpy models, the CLI.

The checkpoints are written in PyTorch's zip format by a small test-only writer (torch is
not installed): `archive/data.pkl` (pickle protocol 2, tensors as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`,
storages as persistent ids `('storage', torch.FloatStorage, key, 'cpu', numel)`, LongStorage
for int64), the raw
little-endian bytes of every storage in `archive/data/<key>`, and `archive/version`.
"""

import argparse
import collections
import io
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from aeir_jax.errors import DataError
from aeir_jax.models.discriminator import Discriminators
from aeir_jax.models.encoders import ImageEncoder, TextEncoder
from aeir_jax.models.sgraf import SGRAFHead
from aeir_jax.tools.import_torch import convert_state_dicts, main, model_sizes
# The numpy SGRAF lives beside the head's own tests (pytest puts tests/ on sys.path).
from test_sgraf import np_l2norm, np_sigmoid, numpy_sgraf, random_head_state_dict

IMG_DIM, EMBED, VOCAB, WORD_DIM, SIM, N_REG, DISC_HIDDEN = 12, 16, 20, 8, 8, 5, 8
LENGTHS = (4, 1, 6, 3)

# ---------------------------------------------------------------- torch zip writer


_STORAGE_TYPES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage'}


class _Storage:
  """A float32 or int64 storage: its elements, saved as one `data/<key>` record."""

  def __init__(self, values: np.ndarray):
    self.values = np.ascontiguousarray(values, values.dtype.newbyteorder('<')).ravel()
    self.type_name = _STORAGE_TYPES[values.dtype]


class _Tensor:
  """Pickles as `torch._utils._rebuild_tensor_v2(...)` over a storage, like a torch.Tensor."""

  def __init__(self, array: np.ndarray, rebuild):
    self.array, self.rebuild = array, rebuild

  def __reduce__(self):
    shape = self.array.shape
    stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    return self.rebuild, (_Storage(self.array), 0, shape, stride, False,
                          collections.OrderedDict())


def _fake_torch_modules():
  """Stand-ins for the torch globals a checkpoint references, importable while pickling."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  for name in _STORAGE_TYPES.values():
    setattr(torch, name, type(name, (), {'__module__': 'torch', '__qualname__': name}))

  def _rebuild_tensor_v2(*args):
    raise AssertionError('never called')

  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  torch._utils = utils
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  return {'torch': torch, 'torch._utils': utils}


def _as_torch_objects(obj, rebuild):
  """numpy arrays -> _Tensor; state dicts keep their OrderedDict type and `_metadata`."""
  if isinstance(obj, np.ndarray):
    return _Tensor(obj, rebuild)
  if isinstance(obj, dict):
    out = type(obj)((k, _as_torch_objects(v, rebuild)) for k, v in obj.items())
    if hasattr(obj, '_metadata'):
      out._metadata = obj._metadata
    return out
  if isinstance(obj, list):
    return [_as_torch_objects(v, rebuild) for v in obj]
  return obj


def save_torch_zip(obj, path):
  """Writes `obj` (numpy arrays as tensors) as `torch.save` would, zip format."""
  modules = _fake_torch_modules()
  storages = []

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        storages.append(obj)
        key = str(len(storages) - 1)
        storage_type = getattr(modules['torch'], obj.type_name)
        return ('storage', storage_type, key, 'cpu', obj.values.size)
      return None

  buffer = io.BytesIO()
  with mock.patch.dict(sys.modules, modules):
    Pickler(buffer, protocol=2).dump(
        _as_torch_objects(obj, modules['torch._utils']._rebuild_tensor_v2))
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', buffer.getvalue())
    archive.writestr('archive/byteorder', 'little')
    for key, storage in enumerate(storages):
      archive.writestr(f'archive/data/{key}', storage.values.tobytes())
    archive.writestr('archive/version', '3\n')


# ---------------------------------------------------------------- reference state dicts


def _state_dict(tensors):
  """An OrderedDict with `_metadata`, as `nn.Module.state_dict()` returns."""
  sd = collections.OrderedDict(
      (k, np.asarray(v, np.int64 if k.endswith('num_batches_tracked') else np.float32))
      for k, v in tensors.items())
  sd._metadata = collections.OrderedDict([('', {'version': 1})])
  return sd


def reference_state_dicts(rng, aggregation='saf', with_discriminators=True):
  """Random state dicts with SGRAF/AECR's exact tensor names and (small) shapes."""
  u = lambda *shape: rng.uniform(-0.5, 0.5, shape)
  image = {'fc.weight': u(EMBED, IMG_DIM), 'fc.bias': u(EMBED)}
  text = {'embed.weight': rng.uniform(-1, 1, (VOCAB, WORD_DIM))}
  for suffix in ('', '_reverse'):
    text.update({f'cap_rnn.weight_ih_l0{suffix}': u(3 * EMBED, WORD_DIM),
                 f'cap_rnn.weight_hh_l0{suffix}': u(3 * EMBED, EMBED),
                 f'cap_rnn.bias_ih_l0{suffix}': u(3 * EMBED),
                 f'cap_rnn.bias_hh_l0{suffix}': u(3 * EMBED)})
  head = random_head_state_dict(rng, aggregation, embed=EMBED, sim=SIM, regions=N_REG)
  sds = [_state_dict(image), _state_dict(text), _state_dict(head)]
  if with_discriminators:
    for _ in range(2):
      sds.append(_state_dict({
          'discriminator.0.weight': u(DISC_HIDDEN, EMBED), 'discriminator.0.bias': u(DISC_HIDDEN),
          'discriminator.3.weight': u(64, DISC_HIDDEN), 'discriminator.3.bias': u(64),
          'discriminator.6.weight': u(1, 64), 'discriminator.6.bias': u(1)}))
  return sds


def reference_checkpoint(sds):
  """The dict SGRAF/AECR `save_checkpoint` writes."""
  opt = argparse.Namespace(embed_size=EMBED, sim_dim=SIM, module_name='SAF', lamda=0.001)
  return {'epoch': 3, 'model': sds, 'opt': opt, 'Eiters': 1234, 'best_rsum': 0.0}


# ---------------------------------------------------------------- numpy encoders


def numpy_image_encoder(sd, regions):
  return np_l2norm(regions @ sd['fc.weight'].T + sd['fc.bias'])


def numpy_gru(sd, suffix, inputs):
  """One PyTorch GRU direction over `[n, W]` inputs; returns `[n, H]` hidden states."""
  w_ih, w_hh = sd[f'cap_rnn.weight_ih_l0{suffix}'], sd[f'cap_rnn.weight_hh_l0{suffix}']
  b_ih, b_hh = sd[f'cap_rnn.bias_ih_l0{suffix}'], sd[f'cap_rnn.bias_hh_l0{suffix}']
  h = np.zeros(w_hh.shape[1])
  outputs = []
  for x in inputs:
    xr, xz, xn = np.split(w_ih @ x + b_ih, 3)
    hr, hz, hn = np.split(w_hh @ h + b_hh, 3)
    r, z = np_sigmoid(xr + hr), np_sigmoid(xz + hz)
    h = (1 - z) * np.tanh(xn + r * hn) + z * h
    outputs.append(h)
  return np.stack(outputs)


def numpy_text_encoder(sd, tokens, lengths):
  """Bidirectional GRU over each caption's true length, directions averaged, l2norm."""
  out = np.zeros(tokens.shape + (EMBED,))
  for c, n in enumerate(lengths):
    emb = sd['embed.weight'][tokens[c, :n]].astype(np.float64)
    fwd = numpy_gru(sd, '', emb)
    bwd = numpy_gru(sd, '_reverse', emb[::-1])[::-1]
    out[c, :n] = np_l2norm((fwd + bwd) / 2)
  return out


def numpy_discriminator(sd, x):
  h = np.maximum(x @ sd['discriminator.0.weight'].T + sd['discriminator.0.bias'], 0)
  h = np.maximum(h @ sd['discriminator.3.weight'].T + sd['discriminator.3.bias'], 0)
  return np_sigmoid(h @ sd['discriminator.6.weight'].T + sd['discriminator.6.bias'])[:, 0]


def random_inputs(rng):
  regions = rng.normal(size=(3, N_REG, IMG_DIM)).astype(np.float32)
  tokens = rng.integers(1, VOCAB, size=(len(LENGTHS), max(LENGTHS)))
  tokens = np.where(np.arange(max(LENGTHS)) < np.asarray(LENGTHS)[:, None], tokens, 0)
  return regions, tokens.astype(np.int32), np.asarray(LENGTHS, np.int32)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize('aggregation', ['saf', 'sgr'])
def test_imported_model_matches_numpy_reference(aggregation):
  rng = np.random.default_rng(0)
  sds = reference_state_dicts(rng, aggregation)
  tree = convert_state_dicts(sds)
  params, stats = tree['params'], tree['batch_stats']
  regions, tokens, lengths = random_inputs(rng)

  img = ImageEncoder(EMBED).apply({'params': params['image_encoder']}, regions)
  np.testing.assert_allclose(img, numpy_image_encoder(sds[0], regions), rtol=1e-5, atol=1e-6)
  text_encoder = TextEncoder(VOCAB, WORD_DIM, EMBED, dropout=0.0)
  cap = text_encoder.apply({'params': params['text_encoder']}, tokens, lengths)
  np.testing.assert_allclose(cap, numpy_text_encoder(sds[1], tokens, lengths), rtol=1e-5,
                             atol=1e-6)

  sizes = model_sizes(tree)
  head = SGRAFHead(embed_dim=sizes['embed_dim'], sim_dim=sizes['sim_dim'],
                   aggregation=sizes['aggregation'], sgr_steps=sizes['sgr_steps'], dropout=0.0)
  mask = np.arange(tokens.shape[1]) < lengths[:, None]
  scores = head.apply({'params': params['sim_head'], 'batch_stats': stats['sim_head']},
                      img, cap, mask)
  expected, _ = numpy_sgraf(sds[2], numpy_image_encoder(sds[0], regions),
                            numpy_text_encoder(sds[1], tokens, lengths), LENGTHS, train=False)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

  pooled_img, pooled_cap = np.asarray(img).mean(1), np.asarray(cap).mean(1)
  z_img, z_cap = Discriminators(hidden=(DISC_HIDDEN, 64)).apply(
      {'params': tree['discriminators']}, pooled_img, pooled_cap)
  np.testing.assert_allclose(np_sigmoid(np.asarray(z_img)),
                             numpy_discriminator(sds[3], pooled_img), rtol=1e-5)
  np.testing.assert_allclose(np_sigmoid(np.asarray(z_cap)),
                             numpy_discriminator(sds[4], pooled_cap), rtol=1e-5)


def test_converted_tree_matches_model_init():
  sds = reference_state_dicts(np.random.default_rng(1), 'sgr')
  tree = convert_state_dicts(sds)
  regions, tokens, lengths = random_inputs(np.random.default_rng(2))
  key = jax.random.key(0)
  shapes = lambda t: jax.tree.map(np.shape, t)
  img_vars = jax.eval_shape(ImageEncoder(EMBED).init, key, regions)
  txt_vars = jax.eval_shape(TextEncoder(VOCAB, WORD_DIM, EMBED).init, key, tokens, lengths)
  assert shapes(img_vars['params']) == shapes(tree['params']['image_encoder'])
  assert shapes(txt_vars['params']) == shapes(tree['params']['text_encoder'])
  disc_vars = jax.eval_shape(Discriminators(hidden=(DISC_HIDDEN, 64)).init, key,
                             np.zeros((2, EMBED)), np.zeros((2, EMBED)))
  assert shapes(disc_vars['params']) == shapes(tree['discriminators'])
  assert model_sizes(tree) == {'img_dim': IMG_DIM, 'embed_dim': EMBED, 'vocab_size': VOCAB,
                               'word_dim': WORD_DIM, 'sim_dim': SIM, 'num_regions': N_REG,
                               'aggregation': 'sgr', 'sgr_steps': 3}
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('edit, message', [
    (lambda sds: sds[1].pop('cap_rnn.bias_hh_l0'), "text encoder: missing tensor 'cap_rnn.bias"),
    (lambda sds: sds[2].update({'extra.weight': np.zeros(3, np.float32)}),
     'similarity head: unexpected tensors extra.weight'),
    (lambda sds: sds[2].update({'sim_tranglo_w.weight': np.zeros((SIM, 3), np.float32)}),
     r"'sim_tranglo_w.weight' has shape \(8, 3\), expected \(8, 16\)"),
    (lambda sds: sds[1].update({'cap_rnn.weight_ih_l1': np.zeros(3, np.float32)}),
     'multi-layer GRU'),
    (lambda sds: sds.pop(), 'expected 3 \\(SGRAF\\) or 5 \\(AECR\\) state dicts, got 4'),
])
def test_bad_state_dicts_are_named(edit, message):
  sds = reference_state_dicts(np.random.default_rng(3))
  edit(sds)
  with pytest.raises(DataError, match=message):
    convert_state_dicts(sds)


@pytest.mark.parametrize('fmt, aggregation', [('sgraf', 'saf'), ('aecr', 'sgr')])
def test_cli_writes_orbax_checkpoint(tmp_path, capsys, fmt, aggregation):
  sds = reference_state_dicts(np.random.default_rng(4), aggregation,
                              with_discriminators=fmt == 'aecr')
  ckpt = tmp_path / 'model_best.pth.tar'
  save_torch_zip(reference_checkpoint(sds), ckpt)
  out = tmp_path / 'imported'
  assert main([str(ckpt), str(out)]) == 0
  assert f'format={fmt}' in capsys.readouterr().out
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(out)
    metadata = checkpointer.metadata(out).custom_metadata
  expected = convert_state_dicts(sds)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, restored, expected)
  assert metadata['format'] == fmt and metadata['aggregation'] == aggregation
  assert ('discriminators' in restored) == (fmt == 'aecr')

  assert main([str(ckpt), str(out)]) == 2
  assert 'already exists' in capsys.readouterr().err
  other = 'aecr' if fmt == 'sgraf' else 'sgraf'
  assert main([str(ckpt), str(out), '--force', '--format', other]) == 2
  assert f'--format {other} expects' in capsys.readouterr().err
  assert main([str(ckpt), str(out), '--force', '--format', fmt]) == 0


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  bad = tmp_path / 'notes.pth.tar'
  bad.write_text('not a checkpoint')
  result = subprocess.run([sys.executable, '-m', 'aeir_jax.tools.import_torch', str(bad),
                           str(tmp_path / 'out')], capture_output=True, text=True, check=False,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert not (tmp_path / 'out').exists()
