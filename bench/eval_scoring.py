"""Benchmarks retrieval evaluation: encode a split, score all image-caption pairs, rank.

    python bench/eval_scoring.py                       # dual encoder 1K x 5K and 5K x 25K
    python bench/eval_scoring.py --config configs/default.py --saf_images=100

Random inputs of the config's shapes (regions, feature dim, caption length, vocabulary) and
randomly initialised params: speed does not depend on the values. For each size the median
over `--repeats` of `Evaluator.scores` (encoding and the blockwise score matrix, host fp32)
and of the ranking (`protocols.retrieval_metrics`), compilation excluded.

The pairwise SAF head (`model.similarity=saf`) scores every image-caption pair through its
network, far slower on a CPU: it runs on `--saf_images` images and their captions and is
extrapolated to 1K x 5K in proportion to the number of pairs (an upper bound: encoding
grows only linearly). `--saf_images=1000` measures it in full.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aeir_jax import parallel, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from aeir_jax.data import load_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from aeir_jax.data import base, protocols  # pylint: disable=wrong-import-position
from aeir_jax.evaluate import Evaluator  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list("images", ["1000", "5000"], "Dual-encoder sizes: images (5 captions each).")
flags.DEFINE_integer("saf_images", 100, "Images of the SAF measurement (0: skip SAF).")
flags.DEFINE_integer("repeats", 3, "Timed repeats per size (1 for sizes of 5,000 and more).")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")
config_flags.DEFINE_config_file("config", "configs/default.py", "Config file[:arg].",
                                lock_config=False)
FLAGS = flags.FLAGS


def random_split(data, num_images, seed=0):
  """A split of `num_images` random images and 5 random captions each, shaped like `data`'s."""
  rng = np.random.default_rng(seed)
  like = data.target.test
  images = rng.normal(size=(num_images,) + like.images.shape[1:]).astype(np.float32)
  num_captions = 5 * num_images
  max_len = like.captions.shape[1]
  lengths = rng.integers(max(2, max_len // 2), max_len + 1, num_captions).astype(np.int32)
  if data.caption_dim:
    captions = rng.normal(size=(num_captions,) + like.captions.shape[1:]).astype(np.float32)
  else:
    captions = rng.integers(4, data.vocab_size, (num_captions, max_len)).astype(np.int32)
    captions[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
  return base.RetrievalSplit(images=images, captions=captions, lengths=lengths, name="random")


def evaluator_and_variables(config):
  """An Evaluator of the config's model on one device, and randomly initialised variables."""
  data = load_data(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model, discs = train.build_models(config, data)
  txs = train.build_optimizers(config)
  state = jax.jit(lambda r: train.init_state(config, model, discs, txs, data, r),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  evaluator = Evaluator(model, config.eval.batch_size, parallel.data_sharding(mesh),
                        parallel.replicated(mesh))
  return evaluator, {"params": state["params"]["enc"], **state["model_state"]}, data


def time_scoring(evaluator, variables, split, repeats):
  """Median seconds of scoring and of ranking `split` (after an untimed run that compiles the
  encoders and the scoring block)."""
  evaluator.scores(variables, _first_images(split, evaluator.batch_size))
  score_times, rank_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    sims = evaluator.scores(variables, split)
    score_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    protocols.retrieval_metrics(sims, split.captions_per_image)
    rank_times.append(time.perf_counter() - start)
  return statistics.median(score_times), statistics.median(rank_times)


def _first_images(split, num_images):
  """The first `num_images` images of `split` and their captions."""
  n = min(num_images, split.num_images)
  return base.RetrievalSplit(images=split.images[:n], captions=split.captions[:5 * n],
                        lengths=split.lengths[:5 * n], name=split.name)


def main(argv):
  del argv
  config = FLAGS.config
  results = {"device": jax.devices()[0].device_kind, "dual_encoder": {}, "saf": {}}
  with config.unlocked():
    config.model.similarity = "cosine"
  evaluator, variables, data = evaluator_and_variables(config)
  for n in map(int, FLAGS.images):
    split = random_split(data, n)
    repeats = 1 if n >= 5000 else FLAGS.repeats
    score_s, rank_s = time_scoring(evaluator, variables, split, repeats)
    results["dual_encoder"][f"{n}x{5 * n}"] = {"score_seconds": score_s, "rank_seconds": rank_s}
    print(f"dual encoder {n:>5} x {5 * n:>6}: scores {score_s:7.2f} s, ranking {rank_s:6.2f} s "
          f"(median of {repeats})", flush=True)
  if FLAGS.saf_images:
    with config.unlocked():
      config.model.similarity = "saf"
    evaluator, variables, data = evaluator_and_variables(config)
    n = FLAGS.saf_images
    score_s, rank_s = time_scoring(evaluator, variables, random_split(data, n), FLAGS.repeats)
    full = score_s * (1000 / n) ** 2
    results["saf"] = {"measured": f"{n}x{5 * n}", "score_seconds": score_s,
                      "rank_seconds": rank_s, "extrapolated_1000x5000_seconds": full}
    print(f"SAF head     {n:>5} x {5 * n:>6}: scores {score_s:7.2f} s; 1000 x 5000 "
          f"extrapolated by pairs: {full:.0f} s", flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
