"""Import SGRAF / AECR PyTorch checkpoints as aeir_jax variables (no torch needed).

    python -m aeir_jax.tools.import_torch CKPT OUT [--format auto|sgraf|aecr] [--force]

CKPT is a `torch.save` file holding a dict whose 'model' entry is the list of state dicts
`[image encoder, text encoder, similarity head]` (SGRAF `model_best.pth.tar`) followed, for
AECR `checkpoint_N.pth.tar`, by `[image discriminator, caption discriminator]`. OUT becomes an
Orbax checkpoint of the tree returned by `convert_state_dicts`:

    {'params': {'image_encoder': ..., 'text_encoder': ..., 'sim_head': ...},
     'batch_stats': {'sim_head': ...},             # BatchNorm running statistics
     'discriminators': {'image': ..., 'caption': ...}}   # AECR only

Its custom metadata records the source format and the model sizes read from the tensors
(`embed_dim`, `sim_dim`, `aggregation`, `sgr_steps`, `vocab_size`, ...), which a config must
match. PyTorch Linear weights `(out, in)` become kernels `(in, out)`; GRU weights keep
PyTorch's gate order (r, z, n) along the `3H` axis; BatchNorm weight/bias become
scale/bias and running_mean/var become the batch_stats mean/var.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp

from aeir_jax.errors import DataError, UserError, WorkdirError
from aeir_jax.io.torch_pickle import load_torch_file

FORMATS = ('auto', 'sgraf', 'aecr')
_NUM_STATE_DICTS = {'sgraf': 3, 'aecr': 5}


class _StateDict:
  """One PyTorch state dict being converted; every tensor must be used exactly once."""

  def __init__(self, state_dict: Mapping[str, Any], what: str):
    if not isinstance(state_dict, Mapping):
      raise DataError(f'{what}: expected a state dict (name -> tensor), got '
                      f'{type(state_dict).__name__}')
    self.what = what
    self._left = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}

  def has(self, name: str) -> bool:
    return name in self._left

  def take(self, name: str, shape: Sequence[int | None]) -> np.ndarray:
    """Removes and returns tensor `name` as float32; `shape` entries of None match any size."""
    if name not in self._left:
      raise DataError(f'{self.what}: missing tensor {name!r}')
    value = np.asarray(self._left.pop(name), dtype=np.float32)
    if value.ndim != len(shape) or any(s is not None and s != v
                                       for s, v in zip(shape, value.shape)):
      want = tuple('*' if s is None else s for s in shape)
      raise DataError(f'{self.what}: tensor {name!r} has shape {value.shape}, expected {want}')
    return value

  def linear(self, prefix: str, in_features: int | None, out_features: int | None) -> dict:
    """A PyTorch Linear `(out, in)` weight and bias as a Flax Dense {'kernel', 'bias'}."""
    weight = self.take(f'{prefix}.weight', (out_features, in_features))
    return {'kernel': weight.T.copy(), 'bias': self.take(f'{prefix}.bias', (weight.shape[0],))}

  def batch_norm(self, prefix: str, num_features: int | None) -> tuple[dict, dict]:
    """A PyTorch BatchNorm1d as ({'scale', 'bias'} params, {'mean', 'var'} batch_stats)."""
    scale = self.take(f'{prefix}.weight', (num_features,))
    n = scale.shape[0]
    params = {'scale': scale, 'bias': self.take(f'{prefix}.bias', (n,))}
    stats = {'mean': self.take(f'{prefix}.running_mean', (n,)),
             'var': self.take(f'{prefix}.running_var', (n,))}
    return params, stats

  def finish(self) -> None:
    if self._left:
      names = ', '.join(sorted(self._left)[:5])
      raise DataError(f'{self.what}: unexpected tensors {names}'
                      f'{" ..." if len(self._left) > 5 else ""} (not an SGRAF/AECR model?)')


def _image_encoder(sd: _StateDict) -> dict:
  return {'fc': sd.linear('fc', None, None)}


def _gru_direction(sd: _StateDict, suffix: str, word_dim: int, hidden: int) -> dict:
  h3 = 3 * hidden
  return {'input_kernel': sd.take(f'cap_rnn.weight_ih_l0{suffix}', (h3, word_dim)).T.copy(),
          'input_bias': sd.take(f'cap_rnn.bias_ih_l0{suffix}', (h3,)),
          'hidden_kernel': sd.take(f'cap_rnn.weight_hh_l0{suffix}', (h3, hidden)).T.copy(),
          'hidden_bias': sd.take(f'cap_rnn.bias_hh_l0{suffix}', (h3,))}


def _text_encoder(sd: _StateDict, embed_dim: int) -> dict:
  if sd.has('cap_rnn.weight_ih_l1'):
    raise DataError(f'{sd.what}: multi-layer GRU (num_layers > 1) is not supported')
  if not sd.has('cap_rnn.weight_ih_l0_reverse'):
    raise DataError(f'{sd.what}: unidirectional GRU (bi_gru=False) is not supported')
  embedding = sd.take('embed.weight', (None, None))
  word_dim = embedding.shape[1]
  return {'embed': {'embedding': embedding},
          'gru_fwd': _gru_direction(sd, '', word_dim, embed_dim),
          'gru_bwd': _gru_direction(sd, '_reverse', word_dim, embed_dim)}


def _sim_head(sd: _StateDict, e: int | None) -> tuple[dict, dict]:
  """SGRAF `EncoderSimilarity` -> (SGRAFHead params, SGRAFHead batch_stats).

  `e` is the embedding size, None to read it from the tensors.
  """
  v, t = 'v_global_w', 't_global_w'
  visual_local = sd.linear(f'{v}.embedding_local.0', e, e)
  e = visual_local['kernel'].shape[0]
  local_bn, local_bn_stats = sd.batch_norm(f'{v}.embedding_local.1', None)
  global_bn, global_bn_stats = sd.batch_norm(f'{v}.embedding_global.1', e)
  params = {
      'visual_sa': {'local': visual_local,
                    'local_bn': local_bn,
                    'global': sd.linear(f'{v}.embedding_global.0', e, e),
                    'global_bn': global_bn,
                    'common': sd.linear(f'{v}.embedding_common.0', e, 1)},
      'text_sa': {'local': sd.linear(f'{t}.embedding_local.0', e, e),
                  'global': sd.linear(f'{t}.embedding_global.0', e, e),
                  'common': sd.linear(f'{t}.embedding_common.0', e, 1)},
      'sim_local': sd.linear('sim_tranloc_w', e, None),
  }
  s = params['sim_local']['kernel'].shape[1]
  params['sim_global'] = sd.linear('sim_tranglo_w', e, s)
  params['sim_eval'] = sd.linear('sim_eval_w', s, 1)
  stats = {'visual_sa': {'local_bn': local_bn_stats, 'global_bn': global_bn_stats}}
  if sd.has('SAF_module.attn_sim_w.weight'):
    params['saf_attn'] = sd.linear('SAF_module.attn_sim_w', s, 1)
    params['saf_bn'], stats['saf_bn'] = sd.batch_norm('SAF_module.bn', 1)
  else:
    step = 0
    while sd.has(f'SGR_module.{step}.graph_query_w.weight'):
      prefix = f'SGR_module.{step}'
      params[f'sgr_{step}'] = {'query': sd.linear(f'{prefix}.graph_query_w', s, s),
                               'key': sd.linear(f'{prefix}.graph_key_w', s, s),
                               'graph': sd.linear(f'{prefix}.sim_graph_w', s, s)}
      step += 1
    if step == 0:
      raise DataError(f'{sd.what}: neither SAF_module nor SGR_module tensors found')
  return params, stats


def convert_sim_head(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
  """An SGRAF `EncoderSimilarity` state dict -> (SGRAFHead params, SGRAFHead batch_stats)."""
  sd = _StateDict(state_dict, 'similarity head')
  params, stats = _sim_head(sd, None)
  sd.finish()
  return params, stats


def _discriminator(sd: _StateDict, e: int) -> dict:
  hidden_0 = sd.linear('discriminator.0', e, None)
  hidden_1 = sd.linear('discriminator.3', hidden_0['kernel'].shape[1], None)
  out = sd.linear('discriminator.6', hidden_1['kernel'].shape[1], 1)
  return {'hidden_0': hidden_0, 'hidden_1': hidden_1, 'out': out}


def convert_state_dicts(state_dicts: Sequence[Mapping[str, Any]]) -> dict:
  """Converts SGRAF/AECR PyTorch state dicts to aeir_jax variables.

  Args:
    state_dicts: `[image encoder, text encoder, similarity head]` (SGRAF) or the same followed
      by `[image discriminator, caption discriminator]` (AECR); name -> array (numpy or
      anything `np.asarray` takes), with the reference's exact names and shapes.

  Returns:
    `{'params': {'image_encoder', 'text_encoder', 'sim_head'}, 'batch_stats': {'sim_head'}}`
    plus `'discriminators': {'image', 'caption'}` for AECR; float32 numpy leaves.

  Raises:
    DataError: wrong number of state dicts, a missing, unexpected or misshapen tensor, or a
      model variant aeir_jax does not implement.
  """
  if len(state_dicts) not in _NUM_STATE_DICTS.values():
    raise DataError(f'expected 3 (SGRAF) or 5 (AECR) state dicts, got {len(state_dicts)}')
  names = ('image encoder', 'text encoder', 'similarity head', 'image discriminator',
           'caption discriminator')
  sds = [_StateDict(sd, name) for sd, name in zip(state_dicts, names)]
  image_encoder = _image_encoder(sds[0])
  embed_dim = image_encoder['fc']['kernel'].shape[1]
  text_encoder = _text_encoder(sds[1], embed_dim)
  head_params, head_stats = _sim_head(sds[2], embed_dim)
  tree = {'params': {'image_encoder': image_encoder, 'text_encoder': text_encoder,
                     'sim_head': head_params},
          'batch_stats': {'sim_head': head_stats}}
  if len(sds) == 5:
    tree['discriminators'] = {'image': _discriminator(sds[3], embed_dim),
                              'caption': _discriminator(sds[4], embed_dim)}
  for sd in sds:
    sd.finish()
  return tree


def model_sizes(tree: dict) -> dict:
  """The model sizes of a converted tree, for configs: {'embed_dim', 'sim_dim', ...}."""
  params = tree['params']
  head = params['sim_head']
  embedding = params['text_encoder']['embed']['embedding']
  sgr_steps = sum(1 for name in head if name.startswith('sgr_'))
  return {'img_dim': int(params['image_encoder']['fc']['kernel'].shape[0]),
          'embed_dim': int(params['image_encoder']['fc']['kernel'].shape[1]),
          'vocab_size': int(embedding.shape[0]),
          'word_dim': int(embedding.shape[1]),
          'sim_dim': int(head['sim_eval']['kernel'].shape[0]),
          'num_regions': int(head['visual_sa']['local_bn']['scale'].shape[0]),
          'aggregation': 'sgr' if sgr_steps else 'saf',
          'sgr_steps': sgr_steps}


def load_state_dicts(path: str, fmt: str = 'auto') -> tuple[list, str]:
  """Reads CKPT and returns (its list of state dicts, the format 'sgraf' or 'aecr')."""
  if fmt not in FORMATS:
    raise DataError(f'--format must be one of {FORMATS}, got {fmt!r}')
  checkpoint = load_torch_file(path)
  if not isinstance(checkpoint, Mapping) or 'model' not in checkpoint:
    raise DataError(f"{path}: expected a dict with a 'model' entry (an SGRAF/AECR checkpoint)")
  model = checkpoint['model']
  if not isinstance(model, (list, tuple)) or len(model) not in _NUM_STATE_DICTS.values():
    raise DataError(f"{path}: 'model' should be a list of 3 (SGRAF) or 5 (AECR) state dicts")
  found = 'sgraf' if len(model) == 3 else 'aecr'
  if fmt != 'auto' and fmt != found:
    raise DataError(f'{path}: --format {fmt} expects {_NUM_STATE_DICTS[fmt]} state dicts, the '
                    f'file holds {len(model)} ({found}); use --format auto')
  return list(model), found


def import_checkpoint(path: str, out: str, fmt: str = 'auto', force: bool = False) -> dict:
  """Converts CKPT at `path` and writes the Orbax checkpoint `out`; returns its metadata."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not force:
    raise WorkdirError(f'{out} already exists; remove it or pass --force')
  state_dicts, found = load_state_dicts(path, fmt)
  try:
    tree = convert_state_dicts(state_dicts)
  except DataError as e:
    raise DataError(f'{path}: {e}') from None
  metadata = {'source': os.path.basename(path), 'format': found, **model_sizes(tree)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out, tree, force=force, custom_metadata=metadata)
  return metadata


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m aeir_jax.tools.import_torch',
      description='Convert an SGRAF or AECR PyTorch checkpoint to an Orbax checkpoint.')
  parser.add_argument('ckpt', help='SGRAF model_best.pth.tar or AECR checkpoint_N.pth.tar')
  parser.add_argument('out', help='output Orbax checkpoint directory')
  parser.add_argument('--format', default='auto', choices=FORMATS,
                      help='sgraf: 3 state dicts; aecr: 5 (with discriminators); auto: detect')
  parser.add_argument('--force', action='store_true', help='overwrite OUT if it exists')
  args = parser.parse_args(argv)
  try:
    metadata = import_checkpoint(args.ckpt, args.out, args.format, args.force)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  sizes = ', '.join(f'{k}={v}' for k, v in metadata.items() if k != 'source')
  print(f'wrote {os.path.abspath(args.out)} ({sizes})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
