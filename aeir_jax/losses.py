"""The three AEIR losses as pure functions of arrays (method.md sections 3-5).

Shapes: images have `R` region fragments, captions `L` word fragments (with a boolean mask),
all fragments `D`-dimensional. Every function works on global arrays: under `jit` on a mesh
the hardest negatives, top-K neighbours and discriminator means are taken over the global
batch, whatever the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aeir_jax.models.encoders import safe_norm

_EPS = 1e-8


def _unit(x):
  """Cosine normalisation with the norm clamped at 1e-8 (zero vectors stay zero)."""
  return x / jnp.maximum(safe_norm(x), _EPS)


def _aggregate_phi(cos, mask_x, mask_y, agg, pad_zero_candidate):
  """phi from cosines `cos [..., Fx, Fy]`: max over x-fragments, then sum/mean over y.

  mask_x `[..., Fx]`, mask_y `[..., Fy]` broadcast against `cos`. With `pad_zero_candidate`
  padded x-fragments take part in the max with cosine 0, as the reference's zero vectors do.
  """
  if pad_zero_candidate:
    cos = jnp.where(mask_x[..., :, None], cos, 0.0)
  else:
    cos = jnp.where(mask_x[..., :, None], cos, -jnp.inf)
  best = cos.max(axis=-2)                                   # [..., Fy]
  best = jnp.where(mask_y, best, 0.0)
  total = best.sum(axis=-1)
  if agg == "sum":
    return total
  if agg == "mean":
    return total / jnp.maximum(mask_y.sum(axis=-1), 1)
  raise ValueError(f"unknown fragment aggregation {agg!r}; use 'sum' or 'mean'")


def frag_sim(x, mask_x, y, mask_y, agg="sum", pad_zero_candidate=False):
  """Fragment similarity phi(X_a, Y_b) = agg_{y in Y_b} max_{x in X_a} cos(x, y).

  Args:
    x: `[A, Fx, D]` fragments, mask_x `[A, Fx]` bool.
    y: `[B, Fy, D]` fragments, mask_y `[B, Fy]` bool.
  Returns:
    `[A, B]`; asymmetric (max over the first argument's fragments).
  """
  cos = jnp.einsum("ard,bwd->abrw", _unit(x), _unit(y))
  return _aggregate_phi(cos, mask_x[:, None, :], mask_y[None, :, :], agg, pad_zero_candidate)


def frag_sim_gathered(x, mask_x, y, mask_y, agg="sum", pad_zero_candidate=False):
  """phi between each item and its own K partners.

  Args:
    x: `[A, Fx, D]`, mask_x `[A, Fx]`.
    y: `[A, K, Fy, D]`, mask_y `[A, K, Fy]`: the K partners of each x item.
  Returns:
    `[A, K]`.
  """
  cos = jnp.einsum("ard,akwd->akrw", _unit(x), _unit(y))
  return _aggregate_phi(cos, mask_x[:, None, :], mask_y, agg, pad_zero_candidate)


def structural_loss_one_way(tgt, tgt_mask, src, src_mask, src_partner, src_partner_mask, *,
                            k, tau, reduction="sum", detach_p=False, agg="sum",
                            pad_zero_candidate=False):
  """Structural transfer from modality m1 to m2 (method.md section 5).

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
  Returns:
    scalar KL(P || Q).
  """
  sim = frag_sim(tgt, tgt_mask, src, src_mask, agg, pad_zero_candidate)        # [Bt, Bs]
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
  """Hinge triplet loss on a source score matrix (method.md section 3).

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
