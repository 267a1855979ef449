"""Each AEIR loss against a plain numpy formula written from docs/method.md (loops, no vectors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax import losses


def _np_cos(a, b):
  return float(a @ b / (max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(b), 1e-8)))


def _np_phi(xa, la, yb, lb, agg="sum", zero_candidate=False):
  """phi for one pair: over the real fragments of y, max over fragments of x, summed."""
  total = 0.0
  for w in range(lb):
    cands = [_np_cos(xa[r], yb[w]) for r in range(la)]
    if zero_candidate and la < len(xa):
      cands.append(0.0)  # padded x fragments are zero vectors: cosine 0
    total += max(cands)
  return total / lb if agg == "mean" else total


def _fragments(rng, n, f, d, lengths=None):
  x = rng.normal(size=(n, f, d)).astype(np.float32)
  lengths = np.full(n, f) if lengths is None else np.asarray(lengths)
  mask = np.arange(f)[None, :] < lengths[:, None]
  return x * mask[..., None], mask, lengths


@pytest.mark.parametrize("agg", ["sum", "mean"])
@pytest.mark.parametrize("zero_candidate", [False, True])
def test_frag_sim_matches_loop(agg, zero_candidate):
  rng = np.random.default_rng(0)
  x, mx, lx = _fragments(rng, 3, 5, 4, [5, 2, 3])
  y, my, ly = _fragments(rng, 4, 6, 4, [1, 6, 4, 2])
  got = np.asarray(losses.frag_sim(x, mx, y, my, agg, zero_candidate))
  want = np.array([[_np_phi(x[a], lx[a], y[b], ly[b], agg, zero_candidate) for b in range(4)]
                   for a in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _np_struct_one_way(t, lt, s, ls, p, lp, k, tau, reduction, agg):
  total = []
  for i in range(len(t)):
    sims = np.array([_np_phi(t[i], lt[i], s[j], ls[j], agg) for j in range(len(s))])
    nbrs = np.argsort(-sims, kind="stable")[:k]
    a = sims[nbrs]
    b = np.array([_np_phi(t[i], lt[i], p[j], lp[j], agg) for j in nbrs])
    pa = np.exp(a / tau - np.max(a / tau)); pa /= pa.sum()
    qb = np.exp(b / tau - np.max(b / tau)); qb /= qb.sum()
    total.append(np.sum(pa * (np.log(pa) - np.log(qb))))
  return np.sum(total) if reduction == "sum" else np.mean(total)


@pytest.mark.parametrize("reduction,agg,k,tau", [("sum", "sum", 3, 3.0), ("mean", "mean", 2, 0.5)])
def test_structural_loss_matches_loop(reduction, agg, k, tau):
  rng = np.random.default_rng(1)
  ti, _, lti = _fragments(rng, 4, 6, 8)                    # target images (all regions real)
  tc, tcm, ltc = _fragments(rng, 4, 5, 8, [3, 5, 1, 4])     # target captions
  si, _, lsi = _fragments(rng, 5, 6, 8)
  sc, scm, lsc = _fragments(rng, 5, 5, 8, [2, 5, 4, 3, 5])
  got_i2c, got_c2i = losses.structural_loss(ti, tc, tcm, si, sc, scm, k=k, tau=tau,
                                            reduction=reduction, agg=agg)
  want_i2c = _np_struct_one_way(ti, lti, si, lsi, sc, lsc, k, tau, reduction, agg)
  want_c2i = _np_struct_one_way(tc, ltc, sc, lsc, si, lsi, k, tau, reduction, agg)
  np.testing.assert_allclose(float(got_i2c), want_i2c, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(got_c2i), want_c2i, rtol=1e-4, atol=1e-6)


def test_structural_detach_p_changes_only_gradient():
  rng = np.random.default_rng(2)
  ti, _, _ = _fragments(rng, 3, 4, 6)
  tc, tcm, _ = _fragments(rng, 3, 5, 6, [2, 5, 3])
  si, _, _ = _fragments(rng, 6, 4, 6)
  sc, scm, _ = _fragments(rng, 6, 5, 6, [4, 2, 5, 3, 1, 5])

  def f(si, detach):
    return sum(losses.structural_loss(ti, tc, tcm, si, sc, scm, k=3, tau=1.0,
                                      detach_p=detach))

  assert np.isclose(float(f(si, False)), float(f(si, True)))
  g_full = np.asarray(jax.grad(f)(si, False))
  g_detached = np.asarray(jax.grad(f)(si, True))
  assert not np.allclose(g_full, g_detached)


def _np_triplet(s, margin, max_violation, reduction):
  n = len(s)
  total = 0.0
  for i in range(n):  # image i as query, captions j as negatives
    costs = [max(0.0, margin + s[i, j] - s[i, i]) for j in range(n) if j != i]
    total += max(costs) if max_violation else sum(costs)
  for j in range(n):  # caption j as query, images i as negatives
    costs = [max(0.0, margin + s[i, j] - s[j, j]) for i in range(n) if i != j]
    total += max(costs) if max_violation else sum(costs)
  return total / n if reduction == "mean" else total


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triplet_matches_loop(max_violation, reduction):
  s = np.random.default_rng(3).uniform(-1, 1, size=(6, 6)).astype(np.float32)
  got = float(losses.triplet_loss(s, 0.2, max_violation, reduction))
  np.testing.assert_allclose(got, _np_triplet(s, 0.2, max_violation, reduction), rtol=1e-5)


def test_triplet_hardest_negative_picks_the_max():
  # One clear hardest negative per query: only it counts.
  s = np.array([[0.9, 0.8, 0.1], [0.0, 0.5, 0.2], [0.3, 0.1, 0.7]], np.float32)
  # image queries: row0 hardest 0.8 -> 0.1; row1 hardest 0.2 -> 0; row2 hardest 0.3 -> 0
  # caption queries: col0 hardest 0.3 -> 0; col1 hardest 0.8 -> 0.5; col2 hardest 0.2 -> 0
  np.testing.assert_allclose(float(losses.triplet_loss(s, 0.2)), 0.1 + 0.5, rtol=1e-6)


def test_adversarial_losses_match_log_sigmoid():
  rng = np.random.default_rng(4)
  zs, zt = rng.normal(size=7) * 3, rng.normal(size=5) * 3
  sig = lambda z: 1 / (1 + np.exp(-z))
  disc, adv, acc = losses.adversarial_losses(jnp.asarray(zs), jnp.asarray(zt))
  want_disc = -np.mean(np.log(sig(zs))) - np.mean(np.log(1 - sig(zt)))
  want_adv = -np.mean(np.log(1 - sig(zs))) - np.mean(np.log(sig(zt)))
  want_acc = 0.5 * (np.mean(zs > 0) + np.mean(zt < 0))
  np.testing.assert_allclose([float(disc), float(adv), float(acc)],
                             [want_disc, want_adv, want_acc], rtol=1e-5)


def test_adversarial_losses_finite_when_saturated():
  disc, adv, _ = losses.adversarial_losses(jnp.array([200.0]), jnp.array([-200.0]))
  assert np.isfinite(float(disc)) and np.isfinite(float(adv))
  np.testing.assert_allclose(float(adv), 400.0, rtol=1e-6)


def test_pooling_modes():
  rng = np.random.default_rng(5)
  x, m, lengths = _fragments(rng, 3, 5, 4, [1, 3, 5])
  masked = np.asarray(losses.pool_fragments(x, m, "masked_mean"))
  padded = np.asarray(losses.pool_fragments(x, m, "padded_mean"))
  for b in range(3):
    np.testing.assert_allclose(masked[b], x[b, :lengths[b]].mean(0), rtol=1e-5)
    np.testing.assert_allclose(padded[b], x[b, :lengths[b]].sum(0) / 5, rtol=1e-5)
