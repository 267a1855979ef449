"""SGRAFHead against a plain numpy SGRAF that loops over captions like the reference.

The numpy model reads PyTorch-named state dicts (weights `(out, in)`), so the Flax variables
come from `convert_state_dicts`; that also checks the importer's head mapping.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax.errors import ConfigError
from aeir_jax.models.sgraf import SGRAFHead, pairwise_scores_chunked
from aeir_jax.tools.import_torch import convert_sim_head

N_IMG, N_REG, EMBED, SIM = 3, 5, 16, 8
LENGTHS = (2, 5, 3, 4)
SGR_STEPS = 3


# ---------------------------------------------------------------- numpy reference


def np_l2norm(x, axis=-1):
  return x / (np.sqrt(np.square(x).sum(axis, keepdims=True)) + 1e-8)


def np_softmax(x, axis):
  x = np.exp(x - x.max(axis, keepdims=True))
  return x / x.sum(axis, keepdims=True)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_linear(sd, name, x):
  return x @ sd[f'{name}.weight'].T + sd[f'{name}.bias']


def np_batch_norm(sd, name, x, train):
  """PyTorch BatchNorm1d on `[N, C]` or `[N, C, L]`; returns (y, (mean, biased var, count))."""
  reduce = (0,) if x.ndim == 2 else (0, 2)
  shape = (1, -1) if x.ndim == 2 else (1, -1, 1)
  if train:
    mean, var = x.mean(reduce), x.var(reduce)
  else:
    mean, var = sd[f'{name}.running_mean'], sd[f'{name}.running_var']
  y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5)
  y = y * sd[f'{name}.weight'].reshape(shape) + sd[f'{name}.bias'].reshape(shape)
  return y, (mean, var, x.size // x.shape[1])


def numpy_sgraf(sd, img, cap, lengths, train, smooth=9.0):
  """SGRAF `EncoderSimilarity` (no dropout), one caption at a time at its true length.

  Args:
    sd: PyTorch-named similarity-head state dict.
    img: `[Ni, R, E]`; cap: `[Nc, L, E]`; lengths: `[Nc]` true caption lengths.
    train: batch statistics (True) or running statistics.

  Returns:
    (scores `[Ni, Nc]`, {BatchNorm name: (mean, biased var, count) or a list of them per
    caption for the SAF BatchNorm}).
  """
  img, cap = np.asarray(img, np.float64), np.asarray(cap, np.float64)
  stats = {}
  v = 'v_global_w'
  local = np_linear(sd, f'{v}.embedding_local.0', img)
  local, stats['local_bn'] = np_batch_norm(sd, f'{v}.embedding_local.1', local, train)
  glob = np_linear(sd, f'{v}.embedding_global.0', img.mean(1))
  glob, stats['global_bn'] = np_batch_norm(sd, f'{v}.embedding_global.1', glob, train)
  common = np_linear(sd, f'{v}.embedding_common.0', np.tanh(local) * np.tanh(glob)[:, None])
  weights = np_softmax(common[..., 0], axis=1)
  img_glo = np_l2norm((weights[..., None] * img).sum(1))

  stats['saf_bn'] = []
  columns = []
  for c, n_words in enumerate(lengths):
    words = cap[c, :n_words]
    t = 't_global_w'
    local = np.tanh(np_linear(sd, f'{t}.embedding_local.0', words))
    glob = np.tanh(np_linear(sd, f'{t}.embedding_global.0', words.mean(0)))
    weights = np_softmax(np_linear(sd, f'{t}.embedding_common.0', local * glob)[:, 0], axis=0)
    cap_glo = np_l2norm((weights[:, None] * words).sum(0))

    attn = np.einsum('ire,le->irl', img, words)
    attn = np.where(attn > 0, attn, 0.1 * attn)
    attn = np_softmax(smooth * np_l2norm(attn, axis=2), axis=1)
    context = np_l2norm(np.einsum('irl,ire->ile', attn, img))
    sim_loc = np_l2norm(np_linear(sd, 'sim_tranloc_w', np.square(context - words[None])))
    sim_glo = np_l2norm(np_linear(sd, 'sim_tranglo_w', np.square(img_glo - cap_glo)))
    nodes = np.concatenate([sim_glo[:, None], sim_loc], axis=1)       # [Ni, n+1, S]

    if 'SAF_module.bn.weight' in sd:
      logits = np_linear(sd, 'SAF_module.attn_sim_w', nodes).transpose(0, 2, 1)
      logits, caption_stats = np_batch_norm(sd, 'SAF_module.bn', logits, train)
      stats['saf_bn'].append(caption_stats)
      gates = np_sigmoid(logits[:, 0])
      alpha = gates / (np.abs(gates).sum(-1, keepdims=True) + 1e-8)
      sim_vec = np_l2norm((alpha[..., None] * nodes).sum(1))
    else:
      step = 0
      while f'SGR_module.{step}.graph_query_w.weight' in sd:
        g = f'SGR_module.{step}'
        query = np_linear(sd, f'{g}.graph_query_w', nodes)
        key = np_linear(sd, f'{g}.graph_key_w', nodes)
        edges = np_softmax(np.einsum('ins,ims->inm', query, key), axis=-1)
        nodes = np.maximum(np_linear(sd, f'{g}.sim_graph_w', edges @ nodes), 0.0)
        step += 1
      sim_vec = nodes[:, 0]
    columns.append(np_sigmoid(np_linear(sd, 'sim_eval_w', sim_vec))[:, 0])
  return np.stack(columns, axis=1), stats


# ---------------------------------------------------------------- fixtures


def random_head_state_dict(rng, aggregation, embed=EMBED, sim=SIM, regions=N_REG,
                           steps=SGR_STEPS):
  """A PyTorch-named SGRAF head state dict with random weights and BatchNorm statistics."""
  sd = {}

  def linear(name, n_in, n_out, gain=1.5):
    sd[f'{name}.weight'] = rng.normal(0, gain / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
    sd[f'{name}.bias'] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)

  def batch_norm(name, n):
    sd[f'{name}.weight'] = rng.uniform(0.5, 1.5, (n,)).astype(np.float32)
    sd[f'{name}.bias'] = rng.normal(0, 0.1, (n,)).astype(np.float32)
    sd[f'{name}.running_mean'] = rng.normal(0, 0.2, (n,)).astype(np.float32)
    sd[f'{name}.running_var'] = rng.uniform(0.2, 2.0, (n,)).astype(np.float32)
    sd[f'{name}.num_batches_tracked'] = np.array(7, np.int64)

  for branch in ('v_global_w', 't_global_w'):
    linear(f'{branch}.embedding_local.0', embed, embed)
    linear(f'{branch}.embedding_global.0', embed, embed)
    linear(f'{branch}.embedding_common.0', embed, 1)
  batch_norm('v_global_w.embedding_local.1', regions)
  batch_norm('v_global_w.embedding_global.1', embed)
  linear('sim_tranloc_w', embed, sim)
  linear('sim_tranglo_w', embed, sim)
  linear('sim_eval_w', sim, 1, gain=6.0)
  if aggregation == 'saf':
    linear('SAF_module.attn_sim_w', sim, 1)
    batch_norm('SAF_module.bn', 1)
  else:
    for step in range(steps):
      for name in ('graph_query_w', 'graph_key_w', 'sim_graph_w'):
        linear(f'SGR_module.{step}.{name}', sim, sim)
  return sd


def random_fragments(rng, n_img=N_IMG, lengths=LENGTHS, pad_to=None, embed=EMBED):
  """Unit-norm region and word embeddings; padded words are zero. Returns (img, cap, mask)."""
  img = np_l2norm(rng.normal(size=(n_img, N_REG, embed))).astype(np.float32)
  max_len = pad_to or max(lengths)
  mask = np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]
  cap = np_l2norm(rng.normal(size=(len(lengths), max_len, embed))) * mask[..., None]
  return img, cap.astype(np.float32), mask


def head_variables(sd):
  """Flax variables of SGRAFHead from a PyTorch-named head state dict."""
  params, batch_stats = convert_sim_head(sd)
  return {'params': params, 'batch_stats': batch_stats}


def make_head(aggregation, dropout=0.0):
  return SGRAFHead(embed_dim=EMBED, sim_dim=SIM, aggregation=aggregation, sgr_steps=SGR_STEPS,
                   dropout=dropout)


@functools.lru_cache(maxsize=None)
def jitted_apply(aggregation, train):
  """One compiled apply per (aggregation, mode), shared by the tests."""
  head = make_head(aggregation)
  if train:
    return jax.jit(functools.partial(head.apply, train=True, mutable=['batch_stats']))
  return jax.jit(functools.partial(head.apply, train=False))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize('aggregation', ['saf', 'sgr'])
def test_init_tree_matches_imported_tree(aggregation):
  img, cap, mask = random_fragments(np.random.default_rng(0))
  variables = jax.jit(make_head(aggregation).init)(jax.random.key(0), img, cap, mask)
  imported = head_variables(random_head_state_dict(np.random.default_rng(1), aggregation))
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(variables) == shapes(imported)
  # Reference inits: zero biases, BatchNorm scale 1 / bias 0 / running mean 0 / var 1.
  params = variables['params']
  assert np.all(params['sim_local']['bias'] == 0)
  bound = np.sqrt(6.0 / (EMBED + SIM))
  assert np.abs(params['sim_local']['kernel']).max() <= bound
  assert np.all(params['visual_sa']['local_bn']['scale'] == 1)
  assert np.all(variables['batch_stats']['visual_sa']['global_bn']['var'] == 1)


@pytest.mark.parametrize('aggregation', ['saf', 'sgr'])
def test_eval_matches_numpy_reference(aggregation):
  rng = np.random.default_rng(2)
  sd = random_head_state_dict(rng, aggregation)
  img, cap, mask = random_fragments(rng)
  scores = jitted_apply(aggregation, False)(head_variables(sd), img, cap, mask)
  expected, _ = numpy_sgraf(sd, img, cap, LENGTHS, train=False)
  assert scores.shape == (N_IMG, len(LENGTHS)) and scores.dtype == jnp.float32
  assert np.all((scores > 0) & (scores < 1))
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
  # The reference's scores spread enough for the comparison to mean something.
  assert np.ptp(expected) > 0.05


@pytest.mark.parametrize('aggregation', ['saf', 'sgr'])
def test_train_matches_numpy_reference_and_updates_running_stats(aggregation):
  rng = np.random.default_rng(3)
  sd = random_head_state_dict(rng, aggregation)
  img, cap, mask = random_fragments(rng)
  variables = head_variables(sd)
  scores, updates = jitted_apply(aggregation, True)(variables, img, cap, mask)
  expected, stats = numpy_sgraf(sd, img, cap, LENGTHS, train=True)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

  def ema(old, mean, var, count):
    new_mean = 0.9 * old['mean'] + 0.1 * mean
    new_var = 0.9 * old['var'] + 0.1 * var * count / (count - 1)
    return new_mean, new_var

  new_stats = updates['batch_stats']
  old_stats = variables['batch_stats']
  for name in ('local_bn', 'global_bn'):
    new_mean, new_var = ema(old_stats['visual_sa'][name], *stats[name])
    np.testing.assert_allclose(new_stats['visual_sa'][name]['mean'], new_mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(new_stats['visual_sa'][name]['var'], new_var, rtol=1e-5)
  if aggregation == 'saf':
    # Per-caption statistics over Ni x (L_i + 1) values, one EMA step with their mean.
    per_caption = stats['saf_bn']
    assert [count for _, _, count in per_caption] == [N_IMG * (n + 1) for n in LENGTHS]
    mean = np.mean([m for m, _, _ in per_caption])
    var = np.mean([v * n / (n - 1) for _, v, n in per_caption])
    np.testing.assert_allclose(new_stats['saf_bn']['mean'],
                               0.9 * old_stats['saf_bn']['mean'] + 0.1 * mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(new_stats['saf_bn']['var'],
                               0.9 * old_stats['saf_bn']['var'] + 0.1 * var, rtol=1e-5)
  else:
    assert 'saf_bn' not in new_stats


@pytest.mark.parametrize('aggregation', ['saf', 'sgr'])
@pytest.mark.parametrize('train', [False, True])
def test_padding_does_not_change_scores(aggregation, train):
  """Extra padded positions, even non-zero ones, change neither scores nor BatchNorm stats."""
  rng = np.random.default_rng(4)
  variables = head_variables(random_head_state_dict(rng, aggregation))
  img, cap, mask = random_fragments(rng)
  pad = ((0, 0), (0, 3))
  mask_long = np.pad(mask, pad)
  cap_long = np.where(mask_long[..., None], np.pad(cap, pad + ((0, 0),)),
                      rng.normal(size=(len(LENGTHS), cap.shape[1] + 3, EMBED)))
  apply = jitted_apply(aggregation, train)
  short = apply(variables, img, cap, mask)
  long = apply(variables, img, cap_long.astype(np.float32), mask_long)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), short, long)


def test_chunked_scores_equal_unchunked():
  rng = np.random.default_rng(5)
  variables = head_variables(random_head_state_dict(rng, 'saf'))
  lengths = (3, 1, 5, 2, 4, 5, 2, 3, 1)
  img, cap, mask = random_fragments(rng, n_img=7, lengths=lengths)
  full = jitted_apply('saf', False)(variables, img, cap, mask)
  chunked = pairwise_scores_chunked(jitted_apply('saf', False), variables, img, cap,
                                    mask, chunk_images=3, chunk_captions=4)
  assert isinstance(chunked, np.ndarray) and chunked.dtype == np.float32
  assert chunked.shape == (7, len(lengths))
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-7)


def test_train_gradients_finite_and_dropout_uses_rng():
  rng = np.random.default_rng(6)
  head = make_head('saf', dropout=0.4)
  variables = head_variables(random_head_state_dict(rng, 'saf'))
  img, cap, mask = random_fragments(rng, pad_to=max(LENGTHS) + 2)

  def loss(params, img, cap, key):
    scores, _ = head.apply({**variables, 'params': params}, img, cap, mask, train=True,
                           rngs={'dropout': key}, mutable=['batch_stats'])
    return scores.sum(), scores

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  grads, scores_a = grad_fn(variables['params'], img, cap, jax.random.key(0))
  _, scores_b = grad_fn(variables['params'], img, cap, jax.random.key(1))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(grads[2][~mask] == 0)
  assert not np.allclose(scores_a, scores_b)


def test_unknown_aggregation_is_a_config_error():
  img, cap, mask = random_fragments(np.random.default_rng(7))
  with pytest.raises(ConfigError, match='aggregation'):
    make_head('ave').init(jax.random.key(0), img, cap, mask)
