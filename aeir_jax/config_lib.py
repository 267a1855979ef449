"""Shared config building blocks: the base config, variant args and validation.

Every experiment file in `configs/` builds on `base_config()`; the variants here (transfer
ablations, the target-paired oracle, a tiny `smoke` run) apply to any of them.
"""

from __future__ import annotations

import ml_collections

from aeir_jax.data import protocols
from aeir_jax.errors import ConfigError

TRANSFER_VARIANTS = {
    # name: (adversarial weight factor, structural weight factor)
    "aeir": (1.0, 1.0),
    "source_only": (0.0, 0.0),
    "semantic_only": (1.0, 0.0),
    "structural_only": (0.0, 1.0),
    "oracle": (0.0, 0.0),
}
EVAL_SPLITS = ("target_test", "target_dev", "source_test")


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
  c.model.embed_dim = 64
  c.model.word_dim = 64
  c.model.text_dropout = 0.1
  c.model.similarity = "cosine"   # cosine (dual encoder) | saf | sgr
  c.model.sim_dim = 256           # SGRAF heads only
  c.model.sgr_steps = 3
  c.model.head_dropout = 0.4
  c.model.compute_dtype = "float32"  # or bfloat16 (params, similarities and ranks stay fp32)
  c.model.remat_text = False
  # gru: token ids of our vocabulary | features: precomputed caption fragments (linear +
  # l2norm) | minilm: the pretrained all-MiniLM-L6-v2 over its WordPiece ids
  c.model.text_encoder = "gru"
  c.model.text_frozen = False    # minilm only: keep the pretrained weights fixed
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
  c.loss.disc_grad_mode = "clean"  # clean | reference (docs/method.md 6.2)
  # Structural loss: its [Bt, F1, Bs, F2] cosines in blocks of target items of at most this
  # many MB per device (0: all at once). Bounds memory at large batch and keeps a CPU's blocks
  # in cache (4 MB: 3x faster at batch 512 than one block); on accelerators raise it.
  c.loss.struct_block_mb = 4.0

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
  # Per split: named protocols of aeir_jax.data.protocols.STANDARD (e.g. ("coco_5fold1k",
  # "coco_5k")), whose metrics get the protocol's prefix (coco_5fold1k/rsum); empty: the whole
  # matrix under the split's own name (target_test/rsum).
  c.eval.protocols = ml_collections.ConfigDict({name: () for name in EVAL_SPLITS})
  c.eval.batch_size = 250
  c.eval.at_start = True
  c.eval.embed_samples = 200      # images (and their captions) per domain saved for plots
  return c


def override(config, fields: dict):
  """Sets dotted fields (`{"loss.tau": 1.0}`) on a copy-free, possibly locked config."""
  with config.unlocked():
    for dotted, value in fields.items():
      *parents, leaf = dotted.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


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
  if config.data.name == "scan":
    fake = config.data.scan.fake
    fake.train_images, fake.test_images, fake.regions, fake.dim = 40, 10, 6, 32
    config.data.scan.vocab_path = ""
    config.data.scan.max_len = min(config.data.scan.max_len, 16)
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


_CHOICES = {
    "model.similarity": ("cosine", "saf", "sgr"),
    "model.text_encoder": ("gru", "features", "minilm"),
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
                    "train.on_nonfinite", "eval.", "loss.struct_block_mb")


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
  if config.loss.struct_block_mb < 0:
    raise ConfigError(f"loss.struct_block_mb={config.loss.struct_block_mb} must be >= 0 (0: "
                      "the structural loss in one block)")
  if config.loss.k > config.data.source_batch:
    raise ConfigError(f"loss.k={config.loss.k} is larger than data.source_batch="
                      f"{config.data.source_batch}: the top-K neighbours come from the source "
                      "batch; lower loss.k or raise data.source_batch")
  if config.model.text_frozen and config.model.text_encoder != "minilm":
    raise ConfigError(f"model.text_frozen=True only applies to model.text_encoder='minilm', "
                      f"not {config.model.text_encoder!r}; drop it or set "
                      "--config.model.text_encoder=minilm")
  unknown = [s for s in config.eval.splits if s not in EVAL_SPLITS]
  if unknown:
    raise ConfigError(f"eval.splits has unknown split(s) {unknown}; known: "
                      f"{', '.join(EVAL_SPLITS)}")
  for name in EVAL_SPLITS:
    bad = [p for p in config.eval.protocols[name] if p not in protocols.STANDARD]
    if bad:
      raise ConfigError(f"eval.protocols.{name} has unknown protocol(s) {bad}; known: "
                        f"{', '.join(protocols.STANDARD)}")


def eval_prefixes(config, name):
  """Metric key prefixes of evaluation split `name`: its protocols, or the split name."""
  return tuple(config.eval.protocols[name]) or (name,)


def result_prefixes(config, names):
  """Metric key prefixes of the evaluation splits `names`, in order (for results tables)."""
  return [prefix for name in names for prefix in eval_prefixes(config, name)]


def _available_splits(data):
  return {"target_test": data.target.test, "target_dev": data.target.dev,
          "source_test": data.source.test}


def eval_splits(config, data):
  """{name: RetrievalSplit} for the configured evaluation splits that the data has."""
  available = _available_splits(data)
  return {name: available[name] for name in config.eval.splits if available[name] is not None}


def validate_with_data(config, data):
  """Checks that need the data: the text encoder against the caption format, batch sizes
  against split sizes."""
  encoder = config.model.text_encoder
  if data.caption_dim and encoder != "features":
    raise ConfigError(f"data.name={config.data.name!r} gives precomputed caption features "
                      f"(dim {data.caption_dim}), which model.text_encoder={encoder!r} cannot "
                      "read; set --config.model.text_encoder=features")
  if not data.caption_dim and encoder == "features":
    raise ConfigError(f"model.text_encoder='features' needs precomputed caption features but "
                      f"data.name={config.data.name!r} gives token ids; set "
                      "--config.model.text_encoder=gru (or minilm)")
  if encoder == "minilm":
    from aeir_jax.models.minilm import MiniLM  # pylint: disable=g-import-not-at-top
    if data.vocab_size != MiniLM.vocab_size:
      raise ConfigError(f"model.text_encoder='minilm' reads MiniLM WordPiece ids (vocabulary "
                        f"{MiniLM.vocab_size}), but data.name={config.data.name!r} has a "
                        f"vocabulary of {data.vocab_size}; use a data source that tokenizes "
                        "for MiniLM (e.g. flickr8k with features='tokens') or text_encoder=gru")
  for field, split in (("data.source_batch", data.source.train),
                       ("data.target_batch", data.target.train)):
    if _get(config, field) > split.num_captions:
      raise ConfigError(f"{field}={_get(config, field)} exceeds the {split.num_captions} "
                        f"captions of {split.name or 'the train split'}; lower it")
  for name in config.eval.splits:
    split = _available_splits(data)[name]
    if split is None:
      raise ConfigError(f"eval.splits names {name!r} but data.name={config.data.name!r} has no "
                        "such split; remove it from eval.splits")
    folds = [p for p in config.eval.protocols[name] if protocols.STANDARD[p] == "fold5"]
    if folds and split.num_images % 5:
      raise ConfigError(f"eval.protocols.{name}={folds[0]!r} cuts the split into 5 folds, but "
                        f"{split.name or name} has {split.num_images} images (not a multiple "
                        f"of 5); drop it from eval.protocols.{name}")


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
