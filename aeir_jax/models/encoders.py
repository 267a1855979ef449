"""Fragment encoders: image regions and caption words to l2-normalised embeddings.

Both encoders return one embedding per fragment (`[B, F, E]`), as SCAN/SGRAF do; the
similarity heads, the discriminators and the structural loss all work on fragments.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def safe_norm(x, axis=-1, keepdims=True):
  """||x|| along `axis` with a finite gradient at x = 0 (zero vectors are padding)."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=keepdims), 1e-30))


def l2norm(x, axis=-1, eps=1e-8):
  """x / (||x|| + eps) along `axis` (the reference's l2norm, zero vectors stay zero)."""
  return x / (safe_norm(x, axis) + eps)


# Matmuls in the compute dtype (e.g. bfloat16) accumulate and return float32.
f32_dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def uniform_symmetric(bound):
  """Initializer drawing uniform(-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def xavier_uniform_torch(fan_in, fan_out):
  """uniform(+-sqrt(6 / (fan_in + fan_out))), as the reference initialises its Linears."""
  return uniform_symmetric(math.sqrt(6.0 / (fan_in + fan_out)))


class ImageEncoder(nn.Module):
  """Per-region linear projection + l2norm.

  `[B, R, D_img] -> [B, R, E]` float32; the projection runs in `dtype` with float32 params.
  """

  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, regions):
    d_in = regions.shape[-1]
    x = nn.Dense(self.embed_dim, dtype=self.dtype, name="fc", dot_general=f32_dot_general,
                 kernel_init=xavier_uniform_torch(d_in, self.embed_dim),
                 bias_init=nn.initializers.zeros)(regions)
    return l2norm(x.astype(jnp.float32))


class GRU(nn.Module):
  """One GRU direction with PyTorch's parameter layout (gates r, z, n; both bias sets).

  `__call__(inputs [B, L, W], mask [B, L]) -> [B, L, H]`; the state is carried unchanged
  over padded steps, which only ever follow the real ones (reverse the input first for the
  backward direction). Outputs at padded steps are zero. Both matmuls run in `dtype` and
  accumulate in float32; the state and the gates are float32. `remat` recomputes each step's
  activations in the backward pass instead of storing them.
  """

  hidden: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, inputs, mask):
    h_dim = self.hidden
    w_in = inputs.shape[-1]
    init = uniform_symmetric(1.0 / math.sqrt(h_dim))
    input_kernel = self.param("input_kernel", init, (w_in, 3 * h_dim))
    input_bias = self.param("input_bias", init, (3 * h_dim,))
    hidden_kernel = self.param("hidden_kernel", init, (h_dim, 3 * h_dim))
    hidden_bias = self.param("hidden_bias", init, (3 * h_dim,))

    # Input projections for every step at once; only h @ W_hh is sequential.
    x_proj = jnp.einsum("blw,wg->blg", inputs.astype(self.dtype),
                        input_kernel.astype(self.dtype), preferred_element_type=jnp.float32)
    x_proj = x_proj + input_bias

    def step(h, xs):
      xp, m = xs
      hp = jnp.dot(h.astype(self.dtype), hidden_kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32) + hidden_bias
      xr, xz, xn = jnp.split(xp, 3, axis=-1)
      hr, hz, hn = jnp.split(hp, 3, axis=-1)
      r = jax.nn.sigmoid(xr + hr)
      z = jax.nn.sigmoid(xz + hz)
      n = jnp.tanh(xn + r * hn)
      h_new = (1.0 - z) * n + z * h
      h_new = jnp.where(m[:, None], h_new, h)
      return h_new, jnp.where(m[:, None], h_new, 0.0)

    if self.remat:
      step = jax.checkpoint(step)
    h0 = jnp.zeros((inputs.shape[0], h_dim), jnp.float32)
    _, outs = jax.lax.scan(step, h0, (jnp.swapaxes(x_proj, 0, 1), jnp.swapaxes(mask, 0, 1)))
    return jnp.swapaxes(outs, 0, 1)


def reverse_within_length(x, lengths):
  """Reverses each sequence of `x [B, L, ...]` within its true length; pads stay in place.

  An involution: applying it twice gives `x` back.
  """
  steps = jnp.arange(x.shape[1])[None, :]
  idx = jnp.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


class TextEncoder(nn.Module):
  """Word embedding + bidirectional GRU over true lengths, directions averaged, l2norm.

  `__call__(tokens [B, L] int32, lengths [B], train) -> [B, L, E]`, zero at padded steps.
  """

  vocab_size: int
  word_dim: int
  embed_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, tokens, lengths, train: bool = False):
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    emb = nn.Embed(self.vocab_size, self.word_dim, name="embed",
                   embedding_init=uniform_symmetric(0.1))(tokens)
    emb = nn.Dropout(self.dropout, deterministic=not train)(emb)
    fwd = GRU(self.embed_dim, self.dtype, self.remat, name="gru_fwd")(emb, mask)
    emb_rev = reverse_within_length(emb, lengths)
    bwd = GRU(self.embed_dim, self.dtype, self.remat, name="gru_bwd")(emb_rev, mask)
    bwd = reverse_within_length(bwd, lengths)
    out = (fwd + bwd) / 2.0
    return l2norm(out) * mask[..., None]


class FeatureTextEncoder(nn.Module):
  """For precomputed caption fragments `[B, L, Dt]`: linear + l2norm per fragment."""

  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, fragments, lengths, train: bool = False):
    del train
    mask = jnp.arange(fragments.shape[1])[None, :] < lengths[:, None]
    d_in = fragments.shape[-1]
    x = nn.Dense(self.embed_dim, dtype=self.dtype, name="fc", dot_general=f32_dot_general,
                 kernel_init=xavier_uniform_torch(d_in, self.embed_dim),
                 bias_init=nn.initializers.zeros)(fragments)
    return l2norm(x.astype(jnp.float32)) * mask[..., None]
