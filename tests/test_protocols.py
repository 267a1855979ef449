"""Retrieval metrics and protocols against hand-computed ranks."""

import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax.data.protocols import (METRICS, fold_metrics, protocol_metrics, recall_metrics,
                                     retrieval_metrics, retrieval_ranks)

# 2 images x 10 captions; captions 0-4 describe image 0, captions 5-9 image 1.
HAND = np.array([
    [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.95, 0.0, 0.0, 0.0],
    [0.8, 0.0, 0.0, 0.0, 0.0, 0.6, 0.7, 0.1, 0.2, 0.3],
], np.float32)
# i2t: image 0's best caption scores 0.9, beaten by 0.95 (caption 6) -> rank 1;
#      image 1's best caption scores 0.7, beaten by 0.8 (caption 0) -> rank 1.
# t2i: caption 6 (image 1, 0.7) is beaten by image 0 (0.95) -> rank 1; every other caption's
#      own image scores highest in its column -> rank 0.
HAND_METRICS = {"i2t_r1": 0.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 2.0,
                "i2t_meanr": 2.0, "t2i_r1": 90.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
                "t2i_medr": 1.0, "t2i_meanr": 1.1, "rsum": 490.0}


def _assert_metrics(actual, expected):
  assert set(actual) == set(expected)
  for key, value in expected.items():
    assert actual[key] == pytest.approx(value), key


def test_hand_matrix_ranks_and_metrics():
  i2t, t2i = retrieval_ranks(HAND)
  np.testing.assert_array_equal(i2t, [1, 1])
  np.testing.assert_array_equal(t2i, [0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
  _assert_metrics(retrieval_metrics(HAND), HAND_METRICS)


def test_ties_count_optimistically():
  # Every score equal: nothing is strictly greater, so every rank is 0.
  i2t, t2i = retrieval_ranks(np.full((3, 15), 0.5, np.float32))
  assert not i2t.any() and not t2i.any()
  # A negative tied with the best positive does not push it down either.
  sims = np.zeros((2, 10), np.float32)
  sims[0, :5] = [0.2, 0.7, 0.1, 0.1, 0.1]
  sims[0, 8] = 0.7
  sims[0, 9] = 0.8
  assert retrieval_ranks(sims)[0][0] == 1


def test_i2t_ranks_of_chosen_values():
  # Row n: own captions 0.5, the first r_n other captions 1.0, the rest 0.
  ranks = [0, 0, 1, 3, 4, 5, 8, 9, 10, 20, 30, 50]
  sims = np.zeros((12, 60), np.float32)
  for n, r in enumerate(ranks):
    sims[n, 5 * n:5 * n + 5] = 0.5
    others = [c for c in range(60) if c // 5 != n]
    sims[n, others[:r]] = 1.0
  i2t, _ = retrieval_ranks(sims)
  np.testing.assert_array_equal(i2t, ranks)
  metrics = retrieval_metrics(sims)
  assert metrics["i2t_r1"] == pytest.approx(100 * 2 / 12)
  assert metrics["i2t_r5"] == pytest.approx(100 * 5 / 12)
  assert metrics["i2t_r10"] == pytest.approx(100 * 8 / 12)
  assert metrics["i2t_medr"] == 7.0  # median 6.5 -> floor 6 -> + 1
  assert metrics["i2t_meanr"] == pytest.approx(140 / 12 + 1)


def test_t2i_ranks_of_chosen_values():
  # Column c: its image scores 0.5, the first t_c other images 1.0, the rest 0.
  ranks = [0, 1, 2, 0, 0, 1, 1, 2, 0, 0, 2, 2, 2, 1, 0]
  sims = np.zeros((3, 15), np.float32)
  for c, t in enumerate(ranks):
    sims[c // 5, c] = 0.5
    others = [n for n in range(3) if n != c // 5]
    sims[others[:t], c] = 1.0
  _, t2i = retrieval_ranks(sims)
  np.testing.assert_array_equal(t2i, ranks)
  metrics = retrieval_metrics(sims)
  assert metrics["t2i_r1"] == pytest.approx(40.0)
  assert metrics["t2i_r5"] == metrics["t2i_r10"] == 100.0
  assert metrics["t2i_medr"] == 2.0
  assert metrics["t2i_meanr"] == pytest.approx(14 / 15 + 1)


def test_fold5_averages_folds_and_ignores_cross_fold_scores():
  # 10 images in folds of 2: fold 0 is HAND, folds 1-4 all ties; cross-fold scores are huge
  # (they would dominate the full protocol but lie outside every fold).
  sims = np.full((10, 50), 100.0, np.float32)
  for f in range(5):
    sims[2 * f:2 * f + 2, 10 * f:10 * f + 10] = HAND if f == 0 else 0.5
  expected = {"i2t_r1": 80.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 1.2,
              "i2t_meanr": 1.2, "t2i_r1": 98.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
              "t2i_medr": 1.0, "t2i_meanr": 1.02, "rsum": 578.0}
  _assert_metrics(fold_metrics(sims), expected)
  _assert_metrics(protocol_metrics(sims, "fold5", "coco_5fold1k"),
                  {f"coco_5fold1k/{k}": v for k, v in expected.items()})
  # SCAN's printed 5-fold "rsum" would be 6 x mean i2t recall = 560.
  assert protocol_metrics(sims, "full", "coco_5k")["coco_5k/i2t_r1"] == 0.0


def test_protocol_keys():
  keys = set(protocol_metrics(HAND, "full", "f30k_1k"))
  assert keys == {f"f30k_1k/{m}" for m in METRICS}


def _naive_ranks(sims, cpi=5):
  """Ranks by sorting, as SCAN does (valid without ties)."""
  n = sims.shape[0]
  i2t = [min(np.where(np.argsort(-sims[i]) == c)[0][0] for c in range(cpi * i, cpi * i + cpi))
         for i in range(n)]
  t2i = [np.where(np.argsort(-sims[:, c]) == c // cpi)[0][0] for c in range(cpi * n)]
  return np.array(i2t), np.array(t2i)


def test_chunked_ranks_match_sorting_on_random_scores(tmp_path):
  rng = np.random.default_rng(0)
  sims = rng.standard_normal((600, 3000)).astype(np.float32)
  sims[np.arange(3000) // 5, np.arange(3000)] += 2.0
  expected = _naive_ranks(sims)
  for variant in (sims, jnp.asarray(sims)):
    for actual, wanted in zip(retrieval_ranks(variant), expected):
      np.testing.assert_array_equal(actual, wanted)
  path = tmp_path / "sims.npy"
  np.save(path, sims)
  mapped = np.load(path, mmap_mode="r")
  np.testing.assert_array_equal(retrieval_ranks(mapped)[1], expected[1])


def test_recall_metrics_from_ranks():
  metrics = recall_metrics(np.array([0, 4, 9, 10]), np.array([0, 1]))
  assert metrics["i2t_r1"] == 25.0 and metrics["i2t_r5"] == 50.0
  assert metrics["i2t_r10"] == 75.0 and metrics["i2t_medr"] == 7.0  # median 6.5
  assert metrics["t2i_medr"] == 1.0  # median 0.5 -> floor 0 -> + 1


def test_invalid_inputs():
  with pytest.raises(ValueError, match="sims must be"):
    retrieval_ranks(np.zeros((2, 9)))
  with pytest.raises(ValueError, match="NaN or inf"):
    retrieval_ranks(np.full((2, 10), np.nan))
  with pytest.raises(ValueError, match="equal folds"):
    fold_metrics(np.zeros((7, 35)))
  with pytest.raises(ValueError, match="unknown protocol"):
    protocol_metrics(HAND, "fold10", "x")
