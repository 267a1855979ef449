"""Shared config building blocks: the base config, variant args and validation.

Every experiment file in `configs/` builds on `base_config()`; the variants here (transfer
ablations, the target-paired oracle, a tiny `smoke` run) apply to any of them.
"""

from __future__ import annotations

import ml_collections

from aeir_jax.errors import ConfigError

TRANSFER_VARIANTS = {
    # name: (adversarial weight factor, structural weight factor)
    "aeir": (1.0, 1.0),
    "source_only": (0.0, 0.0),
    "semantic_only": (1.0, 0.0),
    "structural_only": (0.0, 1.0),
    "oracle": (0.0, 0.0),
}


def base_config() -> ml_collections.ConfigDict:
  """Defaults for the built-in benchmark; other configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.variant = "aeir"

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"
  c.data.seed = 0                 # data generation seed (training seeds vary via c.seed)
  c.data.source_batch = 64        # global batch sizes
  c.data.target_batch = 64
  c.data.oracle = False           # train on TARGET train pairs (an upper bound, not transfer)
  c.data.synthetic = ml_collections.ConfigDict(dict(
      source_train=2000, target_train=2000, target_dev=300, target_test=500, source_test=300,
      regions=8, image_dim=48, style_dim=16, max_len=16,
      min_objects=2, max_objects=3, concept_scale=2.0, attribute_weight=0.6,
      attribute_mention=0.8, region_noise=0.3, concept_zipf=0.7,
      source_style_std=0.02, target_style_std=0.6, target_style_offset=0.8,
      target_mixing=0.25,
  ))

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 128
  c.model.word_dim = 64
  c.model.text_dropout = 0.1
  c.model.similarity = "cosine"   # cosine (dual encoder) | saf | sgr
  c.model.sim_dim = 256           # SGRAF heads only
  c.model.sgr_steps = 3
  c.model.head_dropout = 0.4
  c.model.compute_dtype = "float32"  # or bfloat16 (params, similarities and ranks stay fp32)
  c.model.remat_text = False
  c.model.disc_hidden = (256, 64)
  c.model.disc_init = "reference"    # reference: N(0, disc_init_std) | default
  c.model.disc_init_std = 0.01

  c.loss = ml_collections.ConfigDict()
  c.loss.triplet_weight = 1.0     # u
  c.loss.margin = 0.2
  c.loss.max_violation = True
  c.loss.triplet_reduction = "sum"
  c.loss.adv_weight = 1.0         # semantic transfer weight (0 = w/o semantic transfer)
  c.loss.struct_weight = 0.1      # structural transfer weight lambda (0 = w/o structural)
  c.loss.k = 3
  c.loss.tau = 3.0
  c.loss.kl_reduction = "sum"
  c.loss.detach_p = False
  c.loss.frag_agg = "sum"         # phi: sum | mean over the second set's fragments
  c.loss.pad_zero_candidate = False  # reference: padded words are cos-0 max candidates
  c.loss.disc_pool_caption = "masked_mean"  # | padded_mean (reference)
  c.loss.disc_grad_mode = "clean"  # clean | reference (method.md 6.2)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.disc_lr = 2e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 2.0         # <= 0: no clipping
  c.optim.clip_scope = "joint"    # joint (reference) | per_group
  c.optim.lr_decay_steps = 0      # multiply lr by lr_decay_factor every N steps (0: constant)
  c.optim.lr_decay_factor = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1500
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.init_from = ""          # a params-only checkpoint dir (e.g. a source-trained model)
  c.train.on_nonfinite = "skip"   # skip the step | stop the run (state stays the last good one)
  c.train.progress = True

  c.eval = ml_collections.ConfigDict()
  c.eval.splits = ("target_test", "source_test")
  c.eval.batch_size = 250
  c.eval.at_start = True
  c.eval.embed_samples = 200      # images (and their captions) per domain saved for plots
  return c


def parse_arg(arg: str, known_keys=()):
  """Splits 'smoke,source_only,seed=1' into (['smoke', 'source_only'], {'seed': '1'})."""
  variants, kv = [], {}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if "=" in token:
      key, value = token.split("=", 1)
      if key not in known_keys:
        raise ConfigError(f"unknown config arg key {key!r} in {arg!r}; known: "
                          f"{', '.join(known_keys) or 'none'}")
      kv[key] = value
    else:
      variants.append(token)
  return variants, kv


def apply_variants(config, variants):
  """Applies named variants: one transfer variant (TRANSFER_VARIANTS) and/or 'smoke'."""
  transfer = [v for v in variants if v in TRANSFER_VARIANTS]
  unknown = [v for v in variants if v not in TRANSFER_VARIANTS and v != "smoke"]
  if unknown:
    raise ConfigError(f"unknown config variant(s) {unknown}; known: "
                      f"{', '.join(list(TRANSFER_VARIANTS) + ['smoke'])}")
  if len(transfer) > 1:
    raise ConfigError(f"config arg names several transfer variants {transfer}; pick one")
  if transfer:
    name = transfer[0]
    adv, struct = TRANSFER_VARIANTS[name]
    config.variant = name
    config.loss.adv_weight *= adv
    config.loss.struct_weight *= struct
    config.data.oracle = name == "oracle"
  if "smoke" in variants:
    apply_smoke(config)


def apply_smoke(config):
  """Tiny sizes and a few steps: every config runs end to end in seconds."""
  if config.data.name == "synthetic":
    s = config.data.synthetic
    s.source_train, s.target_train, s.target_dev = 80, 80, 20
    s.target_test, s.source_test = 20, 20
  config.data.source_batch = min(config.data.source_batch, 16)
  config.data.target_batch = min(config.data.target_batch, 16)
  config.model.embed_dim = min(config.model.embed_dim, 32)
  config.model.word_dim = min(config.model.word_dim, 16)
  config.model.sim_dim = min(config.model.sim_dim, 16)
  config.model.disc_hidden = (32, 16)
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  config.eval.batch_size = 32
  config.train.progress = False


def ablation_sweep(seeds=(0, 1, 2)):
  """Full AEIR and its ablations, each over seeds; the oracle as a reference point."""
  points = []
  for variant in ("aeir", "semantic_only", "structural_only", "source_only", "oracle"):
    for seed in seeds:
      points.append({"arg": f"{variant},seed={seed}"})
  return points


_CHOICES = {
    "model.similarity": ("cosine", "saf", "sgr"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.disc_init": ("reference", "default"),
    "loss.triplet_reduction": ("sum", "mean"),
    "loss.kl_reduction": ("sum", "mean"),
    "loss.frag_agg": ("sum", "mean"),
    "loss.disc_pool_caption": ("masked_mean", "padded_mean"),
    "loss.disc_grad_mode": ("clean", "reference"),
    "optim.clip_scope": ("joint", "per_group"),
    "train.on_nonfinite": ("skip", "stop"),
}

_POSITIVE = ("data.source_batch", "data.target_batch", "model.embed_dim", "loss.k",
             "loss.tau", "optim.lr", "train.num_steps", "train.log_every", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size")

# Fields that may change between a run and its resumption (they do not change the state).
RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.eval_every",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
                    "train.on_nonfinite", "eval.")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config):
  """Checks names and ranges of config fields; raises ConfigError naming the field."""
  for field, choices in _CHOICES.items():
    value = _get(config, field)
    if value not in choices:
      raise ConfigError(f"{field}={value!r} is not one of {', '.join(choices)}; "
                        f"set --config.{field}=<one of them>")
  for field in _POSITIVE:
    value = _get(config, field)
    if not value > 0:
      raise ConfigError(f"{field}={value!r} must be > 0; set --config.{field} to a positive "
                        "value")
  for field in ("loss.adv_weight", "loss.struct_weight", "loss.triplet_weight"):
    if _get(config, field) < 0:
      raise ConfigError(f"{field} must be >= 0 (0 switches the loss off)")
  if config.loss.k > config.data.source_batch:
    raise ConfigError(f"loss.k={config.loss.k} is larger than data.source_batch="
                      f"{config.data.source_batch}: the top-K neighbours come from the source "
                      "batch; lower loss.k or raise data.source_batch")
  unknown = [s for s in config.eval.splits if s not in EVAL_SPLITS]
  if unknown:
    raise ConfigError(f"eval.splits has unknown split(s) {unknown}; known: "
                      f"{', '.join(EVAL_SPLITS)}")


EVAL_SPLITS = ("target_test", "target_dev", "source_test")


def eval_splits(config, data):
  """{name: RetrievalSplit} for the configured evaluation splits that the data has."""
  available = {"target_test": data.target.test, "target_dev": data.target.dev,
               "source_test": data.source.test}
  return {name: available[name] for name in config.eval.splits if available[name] is not None}


def validate_with_data(config, data):
  """Checks that need the data: batch sizes against split sizes."""
  for field, split in (("data.source_batch", data.source.train),
                       ("data.target_batch", data.target.train)):
    if _get(config, field) > split.num_captions:
      raise ConfigError(f"{field}={_get(config, field)} exceeds the {split.num_captions} "
                        f"captions of {split.name or 'the train split'}; lower it")
  for name in config.eval.splits:
    split = {"target_test": data.target.test, "target_dev": data.target.dev,
             "source_test": data.source.test}[name]
    if split is None:
      raise ConfigError(f"eval.splits names {name!r} but data.name={config.data.name!r} has no "
                        "such split; remove it from eval.splits")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def incompatible_fields(previous: dict, current: dict) -> list[str]:
  """Config fields (dotted) that differ and would change what a checkpoint means."""
  a, b = _flatten(previous), _flatten(current)
  diff = []
  for key in sorted(set(a) | set(b)):
    if key.startswith(RESUMABLE_FIELDS):
      continue
    if a.get(key) != b.get(key):
      diff.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
  return diff
