"""SGRAF similarity heads (SAF and SGR), vectorised over every image-caption pair.

`SGRAFHead(img_frags [Ni, R, E], cap_frags [Nc, L, E], cap_mask [Nc, L], train) -> [Ni, Nc]`
scores in (0, 1), rows images, columns captions. The reference (SGRAF's `EncoderSimilarity`)
loops over captions and slices each one to its true length; here every caption-image pair is
scored at once and the padded words are masked out wherever the reference's slicing would
have left them out:

  * TextSA: the raw global text is the mean over the real words, the attention softmax runs
    over the real words only.
  * SCAN attention: the LeakyReLU'd region-word scores are l2-normalised over the word axis
    per region. The reference normalises over the caption's `L_i` real words; padded words
    are zero vectors there, so their scores (LeakyReLU(0) = 0) would add nothing to the norm
    anyway. They are masked explicitly, so non-zero padding cannot leak in either.
  * SAF and SGR: the node set of a pair is `[global; word_1 .. word_{L_i}]`; padded word
    nodes are zeroed, get no SAF attention weight and are never SGR keys.

BatchNorm follows PyTorch's `BatchNorm1d` (momentum 0.1, eps 1e-5, biased variance for the
normalisation, unbiased variance for the running statistics).

Known deviation from the reference: in train mode the SAF `BatchNorm1d(1)` normalises each
caption with its own statistics over its `Ni x (L_i + 1)` valid values, as the reference does,
but the running statistics take ONE EMA step per forward with the mean over captions of the
per-caption statistics; the reference takes `Nc` successive EMA steps, one per caption. Both
track the same per-caption statistics, over different horizons: the reference's running values
mostly reflect the last ~10 captions of the last batch, ours the last ~10 batches. Given the
same running statistics, eval mode is exact.

Every caption must have at least one real word; images have no padding (all `R` regions are
used).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aeir_jax.errors import ConfigError
from aeir_jax.models.encoders import l2norm, xavier_uniform_torch

AGGREGATIONS = ('saf', 'sgr')


def _dense(in_features: int, out_features: int, name: str) -> nn.Dense:
  """A Linear layer initialised as the reference does: uniform(+-sqrt(6/(in+out))), bias 0."""
  return nn.Dense(out_features, name=name,
                  kernel_init=xavier_uniform_torch(in_features, out_features),
                  bias_init=nn.initializers.zeros)


def _masked_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Sets logits where `mask` is False to the most negative finite float (softmax weight 0)."""
  return jnp.where(mask, logits, jnp.finfo(logits.dtype).min)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch `BatchNorm1d` semantics, optional mask and per-group statistics.

  Train mode normalises with the batch mean and the biased batch variance, reduced over every
  axis of `x` except `feature_axis` and `group_axes`, over the entries where `mask` is True.
  Each index along `group_axes` gets its own statistics. The running statistics then take one
  step `running = (1 - momentum) * running + momentum * stat` with `stat` the batch mean and the
  UNBIASED batch variance, averaged over groups. Eval mode normalises with the running
  statistics. Parameters: `scale`, `bias` `[C]` ('params'); `mean`, `var` `[C]` ('batch_stats').

  Attributes:
    feature_axis: the axis of `x` holding the `C` channels.
    group_axes: axes whose indices are normalised separately in train mode.
    momentum: PyTorch's momentum (weight of the new batch statistic).
    epsilon: added to the variance before the square root.
  """

  feature_axis: int = -1
  group_axes: Sequence[int] = ()
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """`x` any shape; `mask` broadcastable to `x` (True = counts); returns `x`'s shape."""
    ndim = x.ndim
    feature_axis = self.feature_axis % ndim
    group_axes = {a % ndim for a in self.group_axes}
    num_features = x.shape[feature_axis]
    scale = self.param('scale', nn.initializers.ones, (num_features,))
    bias = self.param('bias', nn.initializers.zeros, (num_features,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (num_features,))
    running_var = self.variable('batch_stats', 'var', jnp.ones, (num_features,))
    feature_shape = [1] * ndim
    feature_shape[feature_axis] = num_features

    if train:
      reduce_axes = tuple(a for a in range(ndim) if a != feature_axis and a not in group_axes)
      weight = (jnp.ones_like(x) if mask is None
                else jnp.broadcast_to(mask, x.shape).astype(x.dtype))
      count = weight.sum(reduce_axes, keepdims=True)
      mean = (weight * x).sum(reduce_axes, keepdims=True) / count
      var = (weight * jnp.square(x - mean)).sum(reduce_axes, keepdims=True) / count
      if not self.is_initializing():
        stat_axes = tuple(a for a in range(ndim) if a != feature_axis)
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        m = self.momentum
        running_mean.value = ((1.0 - m) * running_mean.value
                              + m * jnp.mean(mean, stat_axes).reshape(num_features))
        running_var.value = ((1.0 - m) * running_var.value
                             + m * jnp.mean(unbiased, stat_axes).reshape(num_features))
    else:
      mean = running_mean.value.reshape(feature_shape)
      var = running_var.value.reshape(feature_shape)
    normed = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return normed * scale.reshape(feature_shape) + bias.reshape(feature_shape)


class VisualSA(nn.Module):
  """Global image by self-attention over regions: `[Ni, R, E] -> [Ni, E]` (l2-normalised).

  Local branch Linear -> BatchNorm over the region axis (R channels, statistics over images x
  features) -> tanh -> dropout; global branch (on the region mean) Linear -> BatchNorm(E) ->
  tanh -> dropout; region weights softmax(Linear(local * global)).
  """

  dropout: float

  @nn.compact
  def __call__(self, regions: jax.Array, train: bool) -> jax.Array:
    e = regions.shape[-1]
    local = _dense(e, e, 'local')(regions)
    local = BatchNorm(feature_axis=1, name='local_bn')(local, train)
    local = nn.Dropout(self.dropout, deterministic=not train)(jnp.tanh(local))
    glob = _dense(e, e, 'global')(regions.mean(axis=1))
    glob = BatchNorm(feature_axis=-1, name='global_bn')(glob, train)
    glob = nn.Dropout(self.dropout, deterministic=not train)(jnp.tanh(glob))
    logits = _dense(e, 1, 'common')(local * glob[:, None, :])[..., 0]
    weights = jax.nn.softmax(logits, axis=1)
    return l2norm(jnp.einsum('ir,ire->ie', weights, regions))


class TextSA(nn.Module):
  """Global caption by self-attention over its real words: `[Nc, L, E], [Nc, L] -> [Nc, E]`.

  As `VisualSA` without BatchNorm; the raw global text is the mean of the real words and the
  word weights are a softmax over the real words.
  """

  dropout: float

  @nn.compact
  def __call__(self, words: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    e = words.shape[-1]
    mask_f = mask.astype(words.dtype)
    n_words = jnp.maximum(mask_f.sum(axis=1, keepdims=True), 1.0)
    mean = (words * mask_f[..., None]).sum(axis=1) / n_words
    local = _dense(e, e, 'local')(words)
    local = nn.Dropout(self.dropout, deterministic=not train)(jnp.tanh(local))
    glob = _dense(e, e, 'global')(mean)
    glob = nn.Dropout(self.dropout, deterministic=not train)(jnp.tanh(glob))
    logits = _dense(e, 1, 'common')(local * glob[:, None, :])[..., 0]
    weights = jax.nn.softmax(_masked_logits(logits, mask), axis=1)
    return l2norm(jnp.einsum('cl,cle->ce', weights, words))


def scan_text_to_image(regions: jax.Array, words: jax.Array, word_mask: jax.Array,
                       smooth: float) -> jax.Array:
  """SCAN text-to-image attention: the attended image vector of every word of every pair.

  Args:
    regions: `[Ni, R, E]` image regions.
    words: `[Nc, L, E]` caption words.
    word_mask: `[Nc, L]` True at real words.
    smooth: inverse temperature of the softmax over regions (9 in SGRAF).

  Returns:
    `[Ni, Nc, L, E]` l2-normalised `sum_r a_wr v_r`; rows at padded words are defined but
    meaningless.
  """
  scores = jnp.einsum('ire,cle->icrl', regions, words)
  scores = jax.nn.leaky_relu(scores, 0.1) * word_mask[None, :, None, :]
  scores = l2norm(scores, axis=-1)
  attn = jax.nn.softmax(smooth * scores, axis=2)
  return l2norm(jnp.einsum('icrl,ire->icle', attn, regions))


class GraphReasoning(nn.Module):
  """One SGR step on the node sets of all pairs: `[Ni, Nc, N, S], [Nc, N] -> [Ni, Nc, N, S]`.

  `nodes <- ReLU(W_g softmax_keys((W_q nodes)(W_k nodes)^T) nodes)`, padded nodes are no keys.
  """

  @nn.compact
  def __call__(self, nodes: jax.Array, node_mask: jax.Array) -> jax.Array:
    s = nodes.shape[-1]
    query = _dense(s, s, 'query')(nodes)
    key = _dense(s, s, 'key')(nodes)
    edges = jnp.einsum('icns,icms->icnm', query, key)
    edges = jax.nn.softmax(_masked_logits(edges, node_mask[None, :, None, :]), axis=-1)
    return nn.relu(_dense(s, s, 'graph')(jnp.einsum('icnm,icms->icns', edges, nodes)))


class SGRAFHead(nn.Module):
  """SGRAF similarity head (`EncoderSimilarity`): fragment sets to image-caption scores.

  Attributes:
    embed_dim: E, the fragment embedding size.
    sim_dim: S, the size of the similarity vectors.
    aggregation: 'saf' (similarity attention filtration) or 'sgr' (graph reasoning).
    sgr_steps: number of graph reasoning steps (SGR only).
    dropout: dropout rate inside VisualSA and TextSA (train mode only).
    attn_smooth: inverse temperature of SCAN's softmax over regions.
  """

  embed_dim: int
  sim_dim: int = 256
  aggregation: str = 'saf'
  sgr_steps: int = 3
  dropout: float = 0.4
  attn_smooth: float = 9.0

  @nn.compact
  def __call__(self, img_frags: jax.Array, cap_frags: jax.Array, cap_mask: jax.Array,
               train: bool = False) -> jax.Array:
    """Scores every image against every caption.

    Args:
      img_frags: `[Ni, R, E]` region embeddings (all regions valid).
      cap_frags: `[Nc, L, E]` word embeddings (padded words should be zero).
      cap_mask: `[Nc, L]` bool, True at real words; every caption needs at least one.
      train: batch statistics and dropout (needs a 'dropout' rng when dropout > 0, and
        `mutable=['batch_stats']`) or running statistics and no dropout.

    Returns:
      `[Ni, Nc]` float32 scores in (0, 1).
    """
    if self.aggregation not in AGGREGATIONS:
      raise ConfigError(f'sim head aggregation {self.aggregation!r} is not one of '
                        f'{AGGREGATIONS}; set it to "saf" or "sgr"')
    e, s = self.embed_dim, self.sim_dim
    if img_frags.shape[-1] != e or cap_frags.shape[-1] != e:
      raise ValueError(f'SGRAFHead(embed_dim={e}) got image fragments {img_frags.shape} and '
                       f'caption fragments {cap_frags.shape}')
    img_frags = img_frags.astype(jnp.float32)
    cap_frags = cap_frags.astype(jnp.float32)
    cap_mask = cap_mask.astype(bool)

    img_glo = VisualSA(self.dropout, name='visual_sa')(img_frags, train)       # [Ni, E]
    cap_glo = TextSA(self.dropout, name='text_sa')(cap_frags, cap_mask, train)  # [Nc, E]

    context = scan_text_to_image(img_frags, cap_frags, cap_mask, self.attn_smooth)
    sim_loc = jnp.square(context - cap_frags[None])                             # [Ni, Nc, L, E]
    sim_loc = l2norm(_dense(e, s, 'sim_local')(sim_loc))
    sim_glo = jnp.square(img_glo[:, None, :] - cap_glo[None, :, :])             # [Ni, Nc, E]
    sim_glo = l2norm(_dense(e, s, 'sim_global')(sim_glo))

    node_mask = jnp.concatenate([jnp.ones_like(cap_mask[:, :1]), cap_mask], axis=1)
    nodes = jnp.concatenate([sim_glo[:, :, None, :], sim_loc], axis=2)         # [Ni, Nc, N, S]
    nodes = nodes * node_mask[None, :, :, None]

    if self.aggregation == 'saf':
      sim_vec = self._filtration(nodes, node_mask, train)
    else:
      for step in range(self.sgr_steps):
        nodes = GraphReasoning(name=f'sgr_{step}')(nodes, node_mask)
      sim_vec = nodes[:, :, 0, :]
    return jax.nn.sigmoid(_dense(s, 1, 'sim_eval')(sim_vec)[..., 0])

  def _filtration(self, nodes: jax.Array, node_mask: jax.Array, train: bool) -> jax.Array:
    """SAF: `[Ni, Nc, N, S], [Nc, N] -> [Ni, Nc, S]` attention-weighted, l2-normalised nodes.

    The BatchNorm1d(1) on the node logits has per-caption train-mode statistics.
    """
    logits = _dense(self.sim_dim, 1, 'saf_attn')(nodes)                         # [Ni, Nc, N, 1]
    logits = BatchNorm(feature_axis=-1, group_axes=(1,), name='saf_bn')(
        logits, train, mask=node_mask[None, :, :, None])[..., 0]
    gates = jax.nn.sigmoid(logits) * node_mask[None]
    weights = gates / (gates.sum(axis=-1, keepdims=True) + 1e-8)
    return l2norm(jnp.einsum('icn,icns->ics', weights, nodes))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _score_block(apply_fn: Callable, chunk_images: int, chunk_captions: int, variables,
                 img_frags, cap_frags, cap_mask, image_start, caption_start):
  """Scores one `[chunk_images, chunk_captions]` block of the padded inputs."""
  img = jax.lax.dynamic_slice_in_dim(img_frags, image_start, chunk_images, axis=0)
  cap = jax.lax.dynamic_slice_in_dim(cap_frags, caption_start, chunk_captions, axis=0)
  mask = jax.lax.dynamic_slice_in_dim(cap_mask, caption_start, chunk_captions, axis=0)
  return apply_fn(variables, img, cap, mask).astype(jnp.float32)


def pairwise_scores_chunked(apply_fn: Callable, variables, img_frags, cap_frags, cap_mask,
                            chunk_images: int = 100, chunk_captions: int = 100) -> np.ndarray:
  """Eval-mode score matrix of every image against every caption, block by block.

  The inputs are padded to whole blocks once and sent to the device once; each block is
  cut out inside one jitted function, so a single compilation serves every block (and every
  later call with the same `apply_fn` object, block sizes and padded input shapes).

  Args:
    apply_fn: pure `(variables, img [ci, R, E], cap [cc, L, E], mask [cc, L]) -> [ci, cc]`
      eval-mode scorer, e.g. `functools.partial(head.apply, train=False)`. Keep the same
      object across calls to reuse the compiled block.
    variables: the head's variables ({'params', 'batch_stats'}).
    img_frags: `[Ni, R, E]` region embeddings.
    cap_frags: `[Nc, L, E]` word embeddings.
    cap_mask: `[Nc, L]` bool, True at real words.
    chunk_images: images per block.
    chunk_captions: captions per block.

  Returns:
    `[Ni, Nc]` float32 numpy scores.
  """
  if chunk_images < 1 or chunk_captions < 1:
    raise ValueError(f'block sizes must be positive, got {chunk_images} x {chunk_captions}')
  img_frags, cap_frags = np.asarray(img_frags, np.float32), np.asarray(cap_frags, np.float32)
  cap_mask = np.asarray(cap_mask, bool)
  n_img, n_cap = img_frags.shape[0], cap_frags.shape[0]
  pad_img, pad_cap = -n_img % chunk_images, -n_cap % chunk_captions
  # Padded captions get one (zero) real word so that they stay well defined; their scores
  # are dropped below.
  pad_mask = np.zeros((pad_cap, cap_mask.shape[1]), bool)
  pad_mask[:, 0] = True
  img = jnp.asarray(np.pad(img_frags, ((0, pad_img), (0, 0), (0, 0))))
  cap = jnp.asarray(np.pad(cap_frags, ((0, pad_cap), (0, 0), (0, 0))))
  mask = jnp.asarray(np.concatenate([cap_mask, pad_mask]))
  rows = []
  for i in range(0, n_img + pad_img, chunk_images):
    row = [_score_block(apply_fn, chunk_images, chunk_captions, variables, img, cap, mask,
                        np.int32(i), np.int32(c))
           for c in range(0, n_cap + pad_cap, chunk_captions)]
    rows.append(np.asarray(jnp.concatenate(row, axis=1)))
  return np.concatenate(rows, axis=0)[:n_img, :n_cap]
