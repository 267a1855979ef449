"""The three AEIR losses as pure functions of arrays (docs/method.md sections 3-5).

Shapes: images have `R` region fragments, captions `L` word fragments (with a boolean mask),
all fragments `D`-dimensional. Every function works on global arrays: under `jit` on a mesh
the hardest negatives, top-K neighbours and discriminator means are taken over the global
batch, whatever the device count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from aeir_jax.models.encoders import safe_norm

_EPS = 1e-8


def _unit(x):
  """Cosine normalisation with the norm clamped at 1e-8 (zero vectors stay zero)."""
  return x / jnp.maximum(safe_norm(x), _EPS)


def _aggregate(best, mask_y, agg):
  """phi from the best cosine per y-fragment `best [..., Fy]`: sum or mean over real ones."""
  best = jnp.where(mask_y, best, 0.0)
  total = best.sum(axis=-1)
  if agg == "sum":
    return total
  if agg == "mean":
    return total / jnp.maximum(mask_y.sum(axis=-1), 1)
  raise ValueError(f"unknown fragment aggregation {agg!r}; use 'sum' or 'mean'")


def _masked_cosines(x_unit, mask_x, y_unit_t, fill):
  """`[A, Fx, D] x [D, N] -> [A, Fx, N]`, `fill` at padded x-fragments (one matmul)."""
  cos = jnp.einsum("ard,dn->arn", x_unit, y_unit_t)
  return jnp.where(mask_x[..., None], cos, fill)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _best_cosine(x_unit, mask_x, y_unit_t, fill):
  """max over x-fragments: `x_unit [A, Fx, D]`, `mask_x [A, Fx]`, `y_unit_t [D, N] -> [A, N]`.

  The gradient goes to the first maximal x-fragment (PyTorch's `max(dim)` rule; autodiff of
  `max` would split it between exact ties). It is written by hand so that neither pass
  materialises more than the `[A, Fx, N]` cosines in the matmul's own layout.
  """
  return _masked_cosines(x_unit, mask_x, y_unit_t, fill).max(axis=1)


def _best_cosine_fwd(x_unit, mask_x, y_unit_t, fill):
  cos = _masked_cosines(x_unit, mask_x, y_unit_t, fill)
  best_x = jnp.argmax(cos, axis=1)                                            # [A, N]
  best = jnp.take_along_axis(cos, best_x[:, None], axis=1)[:, 0]
  return best, (x_unit, mask_x, y_unit_t, best_x)


def _best_cosine_bwd(fill, residuals, grad):
  del fill
  x_unit, mask_x, y_unit_t, best_x = residuals
  hit = jnp.arange(x_unit.shape[1])[None, :, None] == best_x[:, None, :]      # [A, Fx, N]
  grad_cos = jnp.where(hit & mask_x[..., None], grad[:, None, :], 0.0)
  return (jnp.einsum("arn,dn->ard", grad_cos, y_unit_t), None,
          jnp.einsum("arn,ard->dn", grad_cos, x_unit))


_best_cosine.defvjp(_best_cosine_fwd, _best_cosine_bwd)


def _best_cosine_in_blocks(x_unit, mask_x, y_unit_t, fill, block_bytes, shards):
  """`_best_cosine` over blocks of x-items, one block after another.

  With the A x-items sharded in `shards` equal contiguous parts (the mesh's `data` axis),
  each block takes c items of every shard, c the largest divisor of A / shards whose
  `[c, Fx, N]` float32 cosines fit in `block_bytes`, so every device computes its own rows
  and only one block's cosines exist at a time. `block_bytes` 0, or all fit: one block.
  """
  a, fx, _ = x_unit.shape
  per_shard = a // shards
  row_bytes = fx * y_unit_t.shape[1] * 4
  if not block_bytes or per_shard * row_bytes <= block_bytes:
    return _best_cosine(x_unit, mask_x, y_unit_t, fill)
  fit = max(1, block_bytes // row_bytes)
  c = max(d for d in range(1, fit + 1) if per_shard % d == 0)
  m = per_shard // c
  # Block j holds items j, j + m, j + 2m, ...: c consecutive ones of them in every shard.
  blocks = lambda t: jnp.swapaxes(t.reshape((c * shards, m) + t.shape[1:]), 0, 1)
  best = jax.lax.map(lambda xs: _best_cosine(xs[0], xs[1], y_unit_t, fill),
                     (blocks(x_unit), blocks(mask_x)))                        # [m, c*shards, N]
  return jnp.swapaxes(best, 0, 1).reshape(a, -1)


def frag_sim(x, mask_x, y, mask_y, agg="sum", pad_zero_candidate=False, block_bytes=0,
             shards=1):
  """Fragment similarity phi(X_a, Y_b) = agg_{y in Y_b} max_{x in X_a} cos(x, y).

  With `pad_zero_candidate` padded x-fragments take part in the max with cosine 0, as the
  reference's zero vectors do.

  Args:
    x: `[A, Fx, D]` fragments, mask_x `[A, Fx]` bool.
    y: `[B, Fy, D]` fragments, mask_y `[B, Fy]` bool.
    block_bytes: compute the `[A, Fx, B, Fy]` cosines in blocks of x-items of at most this
      many bytes per shard (0: all at once), `shards` the number of equal parts A is
      sharded in. Blocks change no value beyond float rounding.
  Returns:
    `[A, B]`; asymmetric (max over the first argument's fragments).
  """
  b, fy, d = y.shape
  y_unit_t = _unit(y).reshape(b * fy, d).T
  fill = 0.0 if pad_zero_candidate else -jnp.inf
  best = _best_cosine_in_blocks(_unit(x), mask_x, y_unit_t, fill, block_bytes, shards)
  return _aggregate(best.reshape(-1, b, fy), mask_y[None], agg)


def frag_sim_gathered(x, mask_x, y, mask_y, agg="sum", pad_zero_candidate=False):
  """phi between each item and its own K partners.

  Args:
    x: `[A, Fx, D]`, mask_x `[A, Fx]`.
    y: `[A, K, Fy, D]`, mask_y `[A, K, Fy]`: the K partners of each x item.
  Returns:
    `[A, K]`.
  """
  cos = jnp.einsum("ard,akwd->akrw", _unit(x), _unit(y))
  fill = 0.0 if pad_zero_candidate else -jnp.inf
  best = jnp.where(mask_x[:, None, :, None], cos, fill).max(axis=-2)         # [A, K, Fy]
  return _aggregate(best, mask_y, agg)


def structural_loss_one_way(tgt, tgt_mask, src, src_mask, src_partner, src_partner_mask, *,
                            k, tau, reduction="sum", detach_p=False, agg="sum",
                            pad_zero_candidate=False, block_bytes=0, shards=1):
  """Structural transfer from modality m1 to m2 (docs/method.md section 5).

  Each target item's similarity distribution over its top-K same-modality source neighbours
  (P) must match its cross-modal similarity distribution over those neighbours' partners (Q).

  Args:
    tgt: `[Bt, F1, D]` target m1 fragments, tgt_mask `[Bt, F1]`.
    src: `[Bs, F1', D]` source m1 fragments, src_mask `[Bs, F1']`.
    src_partner: `[Bs, F2, D]` the m2 partners of the source items (aligned by index),
      src_partner_mask `[Bs, F2]`.
    k: neighbours per target item (<= Bs).
    tau: softmax temperature.
    reduction: "sum" over the batch (reference) or "mean".
    detach_p: stop the gradient through P.
    block_bytes, shards: compute the `[Bt, F1, Bs, F1']` cosines in blocks of at most
      `block_bytes` per shard of the batch (0: all at once); bounds memory at large batch
      (see `frag_sim`).
  Returns:
    scalar KL(P || Q).
  """
  sim = frag_sim(tgt, tgt_mask, src, src_mask, agg, pad_zero_candidate, block_bytes,
                 shards)                                                      # [Bt, Bs]
  a, idx = jax.lax.top_k(sim, k)                                              # [Bt, K]
  partners = jnp.take(src_partner, idx, axis=0)                               # [Bt,K,F2,D]
  partner_mask = jnp.take(src_partner_mask, idx, axis=0)                      # [Bt,K,F2]
  b = frag_sim_gathered(tgt, tgt_mask, partners, partner_mask, agg, pad_zero_candidate)
  log_p = jax.nn.log_softmax(a / tau, axis=-1)
  if detach_p:
    log_p = jax.lax.stop_gradient(log_p)
  log_q = jax.nn.log_softmax(b / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)                     # [Bt]
  return _reduce(kl, reduction)


def structural_loss(tgt_img, tgt_cap, tgt_cap_mask, src_img, src_cap, src_cap_mask, **kw):
  """L_struct = L(image -> caption) + L(caption -> image); see structural_loss_one_way."""
  img_mask_t = jnp.ones(tgt_img.shape[:2], bool)
  img_mask_s = jnp.ones(src_img.shape[:2], bool)
  img_to_cap = structural_loss_one_way(tgt_img, img_mask_t, src_img, img_mask_s,
                                       src_cap, src_cap_mask, **kw)
  cap_to_img = structural_loss_one_way(tgt_cap, tgt_cap_mask, src_cap, src_cap_mask,
                                       src_img, img_mask_s, **kw)
  return img_to_cap, cap_to_img


def triplet_loss(scores, margin=0.2, max_violation=True, reduction="sum"):
  """Hinge triplet loss on a source score matrix (docs/method.md section 3).

  Args:
    scores: `[B, B]`, rows images, columns captions, diagonal the true pairs.
    margin: hinge margin.
    max_violation: keep only the hardest negative per query (VSE++); else sum all.
    reduction: "sum" over queries (reference) or "mean".
  """
  diag = jnp.diagonal(scores)
  eye = jnp.eye(scores.shape[0], dtype=bool)
  cost_caption = jnp.where(eye, 0.0, jax.nn.relu(margin + scores - diag[:, None]))
  cost_image = jnp.where(eye, 0.0, jax.nn.relu(margin + scores - diag[None, :]))
  if max_violation:
    per_query = jnp.concatenate([cost_caption.max(axis=1), cost_image.max(axis=0)])
  else:
    per_query = jnp.concatenate([cost_caption.sum(axis=1), cost_image.sum(axis=0)])
  if reduction == "sum":
    return per_query.sum()
  if reduction == "mean":  # mean over the image queries plus mean over the caption queries
    return per_query.sum() / scores.shape[0]
  raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'mean'")


def adversarial_losses(logits_source, logits_target):
  """Domain-adversarial losses from discriminator logits (source label 1, target label 0).

  Returns:
    (disc_loss, adv_loss, accuracy): the discriminator's loss
    `-mean log D(src) - mean log(1 - D(tgt))`, the encoders' loss with inverted labels, and
    the discriminator's accuracy (mean of the two domains' accuracies). Written with
    softplus on logits, never log of a sigmoid.
  """
  disc_loss = jax.nn.softplus(-logits_source).mean() + jax.nn.softplus(logits_target).mean()
  adv_loss = jax.nn.softplus(logits_source).mean() + jax.nn.softplus(-logits_target).mean()
  accuracy = 0.5 * ((logits_source > 0).mean() + (logits_target < 0).mean())
  return disc_loss, adv_loss, accuracy


def pool_fragments(frags, mask, mode="masked_mean"):
  """Pools fragments `[B, F, D]` to `[B, D]` for the discriminators.

  "masked_mean" averages the real fragments; "padded_mean" reproduces the reference, which
  averages over the batch's longest caption (sum of real fragments / max length).
  """
  maskf = mask.astype(frags.dtype)
  total = jnp.einsum("bfd,bf->bd", frags, maskf)
  if mode == "masked_mean":
    return total / jnp.maximum(maskf.sum(axis=1, keepdims=True), 1.0)
  if mode == "padded_mean":
    return total / jnp.maximum(maskf.sum(axis=1).max(), 1.0)
  raise ValueError(f"unknown pooling {mode!r}; use 'masked_mean' or 'padded_mean'")


def _reduce(x, reduction):
  if reduction == "sum":
    return x.sum()
  if reduction == "mean":
    return x.mean()
  raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'mean'")
