"""Read PyTorch checkpoints (`torch.save` files) into numpy, without torch.

Both on-disk formats are supported:
  * zip (PyTorch >= 1.6): `<prefix>/data.pkl` holds the pickled object, each storage is the
    raw little-endian bytes of `<prefix>/data/<key>`;
  * legacy (non-zip): magic number, protocol version and system info (three small pickles),
    the pickled object, the list of storage keys (a pickle), then every storage as an int64
    element count followed by its raw bytes, in key order.

Tensors become C-contiguous numpy arrays (storage offset, size and stride honoured); dicts,
`OrderedDict`s, lists, tuples, numbers, strings, numpy scalars and `argparse.Namespace`s come
back as themselves. The unpickler resolves only a whitelist of globals, so a checkpoint cannot
run code; anything else is refused with a one-line `DataError`.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import zipfile
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from aeir_jax.errors import DataError

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
  'FloatStorage': np.dtype(np.float32),
  'DoubleStorage': np.dtype(np.float64),
  'HalfStorage': np.dtype(np.float16),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype(np.int64),
  'IntStorage': np.dtype(np.int32),
  'ShortStorage': np.dtype(np.int16),
  'CharStorage': np.dtype(np.int8),
  'ByteStorage': np.dtype(np.uint8),
  'BoolStorage': np.dtype(np.bool_),
  'ComplexFloatStorage': np.dtype(np.complex64),
  'ComplexDoubleStorage': np.dtype(np.complex128),
  'UntypedStorage': np.dtype(np.uint8),
}


class _StorageType:
  """Stand-in for a `torch.*Storage` class: only its element dtype matters."""

  def __init__(self, name: str):
    self.dtype = _STORAGE_DTYPES[name]


class _TensorType:
  """Stand-in for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""


def _as_tensor(storage: np.ndarray, offset: int, size, stride) -> Optional[np.ndarray]:
  """Materialises a strided view of a 1-D storage as a C-contiguous array.

  Args:
    storage: `[numel]` the storage's elements, or None during the legacy format's first pass.
    offset: index of the tensor's first element in the storage.
    size: the tensor's shape.
    stride: the tensor's strides, in elements.

  Returns:
    The tensor, shape `size`, or None when `storage` is None.
  """
  if storage is None:
    return None
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or min(size + stride, default=0) < 0:
    raise ValueError(f'bad tensor geometry: size {size}, stride {stride}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= storage.size:
    raise ValueError(f'tensor (offset {offset}, size {size}, stride {stride}) overruns its '
                     f'storage of {storage.size} elements')
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, order='C')


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _as_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  return _as_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  if new_type is not _TensorType:
    raise ValueError(f'unsupported tensor subclass {new_type!r}')
  return func(*args)


def _encode(text: str, encoding: str = 'latin1') -> bytes:
  """`_codecs.encode` as protocol-2 pickles use it for `bytes` objects (latin-1 only)."""
  if encoding not in ('latin1', 'latin-1'):
    raise ValueError(f'unsupported bytes encoding {encoding!r}')
  return text.encode('latin1')


def _torch_size(dims=()) -> tuple:
  return tuple(dims)


_GLOBALS = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('argparse', 'Namespace'): argparse.Namespace,
  ('_codecs', 'encode'): _encode,
  ('builtins', 'set'): set,
  ('__builtin__', 'set'): set,  # protocol 2 writes python 2 module names.
  ('numpy', 'dtype'): np.dtype,
  ('numpy', 'ndarray'): np.ndarray,
  ('numpy.core.multiarray', 'scalar'): np._core.multiarray.scalar,
  ('numpy._core.multiarray', 'scalar'): np._core.multiarray.scalar,
  ('numpy.core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
  ('numpy._core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
  ('torch', 'Size'): _torch_size,
  ('torch', 'Tensor'): _TensorType,
  ('torch.nn.parameter', 'Parameter'): _TensorType,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
  ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
}
_GLOBALS.update({('torch', name): _StorageType(name) for name in _STORAGE_DTYPES})


class _Unpickler(pickle.Unpickler):
  """Unpickler that resolves only `_GLOBALS` and maps storage ids through `storage_fn`."""

  def __init__(self, f, storage_fn: Optional[Callable[[tuple], Any]]):
    super().__init__(f, encoding='utf-8')
    self._storage_fn = storage_fn

  def find_class(self, module: str, name: str):
    try:
      return _GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f'refusing global {module}.{name}') from None

  def persistent_load(self, pid):
    if self._storage_fn is None or not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r:.80}')
    return self._storage_fn(pid[1:])


def _storage_array(buf: bytes, storage_type, numel: int, byteswap: bool = False) -> np.ndarray:
  """Returns the `[numel]` elements of one storage from its raw bytes."""
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(f'bad storage type {storage_type!r:.80}')
  dtype = storage_type.dtype
  numel = int(numel)
  if len(buf) < numel * dtype.itemsize:
    raise pickle.UnpicklingError(f'storage holds {len(buf)} bytes, needs {numel * dtype.itemsize}')
  array = np.frombuffer(buf, dtype, count=numel)
  return array.byteswap() if byteswap else array


def _load_zip(path: str) -> Any:
  """Loads a zip-format checkpoint (`<prefix>/data.pkl` + `<prefix>/data/<key>`)."""
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise DataError(f'{path}: zip file is not a PyTorch checkpoint (no single <prefix>/data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    byteswap = (prefix + 'byteorder' in names
                and archive.read(prefix + 'byteorder').decode().strip() == 'big')
    storages = {}

    def storage_fn(pid: tuple) -> np.ndarray:
      storage_type, key, _, numel = pid[:4]
      if key not in storages:
        member = f'{prefix}data/{key}'
        if member not in names:
          raise pickle.UnpicklingError(f'missing storage {member}')
        storages[key] = _storage_array(archive.read(member), storage_type, numel, byteswap)
      return storages[key]

    with archive.open(pickles[0]) as f:
      return _Unpickler(f, storage_fn).load()


def _load_legacy(path: str, f) -> Any:
  """Loads a legacy (non-zip) checkpoint from the open binary file `f`."""
  try:
    magic = _Unpickler(f, None).load()
  except Exception:
    magic = None
  if magic != _LEGACY_MAGIC:
    raise DataError(f'{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy '
                    'torch.save file)')
  protocol = _Unpickler(f, None).load()
  if protocol != _LEGACY_PROTOCOL:
    raise DataError(f'{path}: unsupported legacy PyTorch checkpoint protocol {protocol!r}')
  sys_info = _Unpickler(f, None).load()
  byteswap = isinstance(sys_info, dict) and sys_info.get('little_endian') is False
  start = f.tell()
  # First pass: learn each storage's type and size; tensors come out as None.
  types = {}

  def record(pid: tuple) -> None:
    storage_type, key, _, numel = pid[:4]
    types[key] = (storage_type, numel)

  _Unpickler(f, record).load()
  keys = _Unpickler(f, None).load()
  storages = {}
  for key in keys:
    storage_type, numel = types[key]
    count = np.frombuffer(f.read(8), '<i8')
    if count.size != 1 or int(count[0]) != int(numel):
      raise pickle.UnpicklingError(f'storage {key}: truncated or size mismatch')
    nbytes = int(numel) * storage_type.dtype.itemsize
    storages[key] = _storage_array(f.read(nbytes), storage_type, numel, byteswap)
  # Second pass: the same pickle, now with the storages' data.

  def storage_fn(pid: tuple) -> np.ndarray:
    key, view = pid[1], pid[4] if len(pid) > 4 else None
    if view is None:
      return storages[key]
    view_key, offset, view_size = view
    return storages[key][offset:offset + view_size]

  f.seek(start)
  return _Unpickler(f, storage_fn).load()


def load_torch_file(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` checkpoint into python containers holding numpy arrays.

  Args:
    path: a zip-format or legacy-format PyTorch checkpoint (`.pth`, `.pt`, `.pth.tar`).

  Returns:
    The saved object: tensors are numpy arrays of the same shape and dtype (bfloat16 via
    `ml_dtypes`), containers and plain values keep their types.

  Raises:
    DataError: the file is missing, is not a PyTorch checkpoint, or holds an object this
      reader refuses (a pickled class or function outside the whitelist).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: checkpoint file not found')
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, 'rb') as f:
      if _is_tar(f):
        raise DataError(f'{path}: tar-format PyTorch checkpoint (PyTorch < 0.4) is not supported')
      return _load_legacy(path, f)
  except DataError:
    raise
  except Exception as e:  # pickle, zip and value errors all mean a malformed checkpoint.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f'{path}: cannot read PyTorch checkpoint: {message}') from e


def _is_tar(f) -> bool:
  """Whether the open binary file `f` is a tar archive (restores the file position)."""
  pos = f.tell()
  f.seek(257)
  magic = f.read(5)
  f.seek(pos)
  return magic == b'ustar'
