"""all-MiniLM-L6-v2: reference similarities, shipped Flickr8k caption embeddings, training use."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax.errors import DataError
from aeir_jax.models.minilm import load_minilm

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'flickr8k'


@pytest.fixture(scope='module')
def model():
  try:
    tokenize, module, params = load_minilm()
  except DataError as e:
    pytest.skip(str(e))
  return tokenize, module, params, jax.jit(module.apply)


def test_reference_cosines(model):
  tokenize, _, params, apply = model
  ids, mask = tokenize(['A man is eating food.', 'A man is eating a piece of bread.',
                        'The stock market fell sharply today.'])
  emb = np.asarray(apply(params, ids, mask)['sentence'])
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  assert round(float(emb[0] @ emb[1]), 4) == 0.7553
  assert round(float(emb[0] @ emb[2]), 4) == 0.0037


def test_padding_does_not_change_outputs(model):
  tokenize, _, params, apply = model
  ids, mask = tokenize(['A dog runs.', 'Two children are playing in the snow near a red house .'])
  short = apply(params, ids, mask)
  padded = apply(params, *tokenize(['A dog runs.', 'x'], length=ids.shape[1] + 9))
  np.testing.assert_allclose(padded['sentence'][0], short['sentence'][0], atol=1e-6)
  n = int(mask[0].sum())
  np.testing.assert_allclose(padded['tokens'][0, :n], short['tokens'][0, :n], atol=1e-5)
  assert short['tokens'].shape == (2, ids.shape[1], 384) and short['mask'].shape == ids.shape


def test_matches_shipped_caption_embeddings(model):
  if not (DATA / 'f8k_minilm_caption_emb_fp16.npy').is_file():
    pytest.skip(f'Flickr8k data not found at {DATA}')
  tokenize, _, params, apply = model
  keys = (DATA / 'f8k_caption_keys.txt').read_text().splitlines()
  lines = (DATA / 'Flickr8k.token.txt').read_text(encoding='utf-8').splitlines()
  rows = list(range(0, len(keys), 1601))
  texts = []
  for r in rows:
    key, caption = lines[r].split('\t', 1)
    assert key == keys[r]
    texts.append(caption)
  emb = np.asarray(apply(params, *tokenize(texts))['sentence'])
  shipped = np.load(DATA / 'f8k_minilm_caption_emb_fp16.npy', mmap_mode='r')[rows]
  np.testing.assert_allclose(emb, shipped.astype(np.float32), atol=2e-4)


def test_trainable_and_frozen(model):
  tokenize, module, params, _ = model
  ids, mask = tokenize(['A cat sleeps on a sofa .', 'A man rides a horse .'])

  def loss(p, m, rng):
    out = m.apply(p, ids, mask, deterministic=False, rngs={'dropout': rng})
    return jnp.sum(out['sentence'][0] * out['sentence'][1])

  rng = jax.random.key(0)
  grads = jax.jit(jax.grad(loss), static_argnums=1)(params, module, rng)
  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
  assert np.isfinite(norm(grads)) and norm(grads) > 0
  frozen = module.clone(frozen=True)
  assert norm(jax.jit(jax.grad(loss), static_argnums=1)(params, frozen, rng)) == 0
  a, b = (jax.jit(loss, static_argnums=1)(params, module, jax.random.key(s)) for s in (1, 2))
  assert a != b  # dropout is active
