"""The built-in two-domain benchmark, generated at run time from a seed (no download).

A known latent structure: every image shows 2-3 *objects*, each a (concept, attribute) pair
from a shared inventory. Image regions are noisy mixtures of concept and attribute prototypes;
captions name the objects ("a red dog with a blue ball"), 5 per image, of varying length.

The two domains share the concepts but differ on both modalities, as a real domain shift does:
  * images: the target applies its own mixing to the content features and carries strong
    domain-specific "style" components (an offset and high-variance noise in dimensions that
    are almost constant in the source); an encoder trained on source pairs alone has never
    learned to ignore them;
  * sentences: each domain phrases captions with its own templates and filler words, and the
    target's filler words never occur in the source;
  * concept frequencies differ between the domains.
A target-paired oracle learns the target's style away; a source-only model does not. That
gap is what the transfer losses are meant to close.

The arrays follow the SCAN precomp conventions of `aeir_jax.data.base` (images `[N, R, D]`,
captions `[5N, L]` token ids with `<start>`/`<end>`, caption c belongs to image c // 5).
"""

from __future__ import annotations

import numpy as np

from aeir_jax.data.base import DomainData, RetrievalSplit, TransferData

SPECIAL = ["<pad>", "<start>", "<end>", "<unk>"]
CONCEPTS = ["dog", "cat", "horse", "bird", "man", "woman", "child", "car", "bike", "boat",
            "ball", "tree", "house", "bench", "kite", "frisbee", "umbrella", "table",
            "chair", "cake", "phone", "guitar", "train", "bus"]
ATTRIBUTES = ["red", "blue", "green", "black", "white", "small", "large", "old"]
SHARED_WORDS = ["a", "and", "with", "the"]
DOMAIN_WORDS = {
    "source": ["photo", "of", "next", "to", "showing"],
    "target": ["there", "is", "are", "in", "this", "scene", "we", "see", "near", "some"],
}
# Caption templates per domain: {o} slots are filled with "[attribute] concept" phrases.
TEMPLATES = {
    "source": [["a", "photo", "of", "{o}"], ["{o}"], ["{o}", "next", "to", "{o}"],
               ["a", "photo", "showing", "{o}"]],
    "target": [["there", "is", "{o}", "in", "this", "scene"], ["we", "see", "{o}"],
               ["{o}", "near", "{o}"], ["there", "are", "some", "{o}"]],
}


def vocabulary():
  words = SPECIAL + CONCEPTS + ATTRIBUTES + SHARED_WORDS
  for domain in ("source", "target"):
    words += [w for w in DOMAIN_WORDS[domain] if w not in words]
  return words


class _Domain:
  """The generative parameters of one domain."""

  def __init__(self, name, rng, cfg, prototypes):
    self.name = name
    self.cfg = cfg
    self.concept_proto, self.attr_proto = prototypes
    content_dim = cfg.image_dim - cfg.style_dim
    if name == "source":
      self.mixing = np.eye(content_dim)
      self.style_offset = np.zeros(cfg.style_dim)
      self.style_std = cfg.source_style_std
    else:
      q, _ = np.linalg.qr(rng.normal(size=(content_dim, content_dim)))
      self.mixing = (1 - cfg.target_mixing) * np.eye(content_dim) + cfg.target_mixing * q
      self.style_offset = rng.normal(size=cfg.style_dim) * cfg.target_style_offset
      self.style_std = cfg.target_style_std
    # Zipf-like concept frequencies over a domain-specific ordering of the concepts.
    order = rng.permutation(len(CONCEPTS))
    weights = 1.0 / (1.0 + np.arange(len(CONCEPTS))) ** cfg.concept_zipf
    self.concept_p = np.empty(len(CONCEPTS))
    self.concept_p[order] = weights / weights.sum()

  def sample(self, rng, num_images):
    """Returns (images [N,R,D] float32, captions as lists of words, 5 per image)."""
    cfg = self.cfg
    content_dim = cfg.image_dim - cfg.style_dim
    images = np.empty((num_images, cfg.regions, cfg.image_dim), np.float32)
    captions = []
    for i in range(num_images):
      n_obj = rng.integers(cfg.min_objects, cfg.max_objects + 1)
      concepts = rng.choice(len(CONCEPTS), n_obj, replace=False, p=self.concept_p)
      attrs = rng.integers(0, len(ATTRIBUTES), n_obj)
      # Region r shows object r for the first n_obj regions, then random objects or clutter.
      owner = np.concatenate([np.arange(n_obj), rng.integers(-1, n_obj, cfg.regions - n_obj)])
      content = rng.normal(size=(cfg.regions, content_dim)) * cfg.region_noise
      for r, o in enumerate(owner):
        if o >= 0:
          content[r] += self.concept_proto[concepts[o]] + cfg.attribute_weight * \
              self.attr_proto[attrs[o]]
      style = self.style_offset + rng.normal(size=(cfg.regions, cfg.style_dim)) * self.style_std
      images[i] = np.concatenate([content @ self.mixing, style], axis=1)
      for _ in range(5):
        captions.append(self._caption(rng, concepts, attrs))
    return images, captions

  def _caption(self, rng, concepts, attrs):
    n = len(concepts)
    k = rng.integers(max(1, n - 1), n + 1)
    chosen = rng.permutation(n)[:k]
    phrases = []
    for o in chosen:
      words = ["a"]
      if rng.random() < self.cfg.attribute_mention:
        words.append(ATTRIBUTES[attrs[o]])
      words.append(CONCEPTS[concepts[o]])
      phrases.append(words)
    fitting = [t for t in TEMPLATES[self.name] if t.count("{o}") <= len(phrases)]
    template = fitting[rng.integers(len(fitting))]
    out = []
    # Fill the template's slots; remaining objects are appended with "and"/"with".
    it = iter(phrases)
    for tok in template:
      if tok == "{o}":
        p = next(it, None)
        if p is not None:
          out += p
      else:
        out.append(tok)
    for p in it:
      out += [rng.choice(["and", "with"])] + p
    return out


def _encode(captions, word_index, max_len):
  ids = np.zeros((len(captions), max_len), np.int32)
  lengths = np.zeros(len(captions), np.int32)
  for c, words in enumerate(captions):
    seq = [1] + [word_index[w] for w in words][: max_len - 2] + [2]
    ids[c, : len(seq)] = seq
    lengths[c] = len(seq)
  return ids, lengths


def _split(images, captions, word_index, max_len, name):
  ids, lengths = _encode(captions, word_index, max_len)
  return RetrievalSplit(images=images, captions=ids, lengths=lengths, name=name,
                        image_ids=[f"{name}_{i}" for i in range(len(images))],
                        caption_texts=[" ".join(c) for c in captions])


def make_benchmark(cfg, seed: int) -> TransferData:
  """Generates the two-domain benchmark described in the module docstring.

  Args:
    cfg: the `data.synthetic` config block (sizes and shift strengths).
    seed: the data seed (the same seed always gives the same data).
  """
  rng = np.random.default_rng(seed)
  content_dim = cfg.image_dim - cfg.style_dim
  concept_proto = rng.normal(size=(len(CONCEPTS), content_dim)) / np.sqrt(content_dim)
  attr_proto = rng.normal(size=(len(ATTRIBUTES), content_dim)) / np.sqrt(content_dim)
  protos = (concept_proto * cfg.concept_scale, attr_proto * cfg.concept_scale)
  words = vocabulary()
  word_index = {w: i for i, w in enumerate(words)}
  domains = {name: _Domain(name, rng, cfg, protos) for name in ("source", "target")}

  def split(domain, n, name):
    images, caps = domains[domain].sample(rng, n)
    return _split(images, caps, word_index, cfg.max_len, name)

  source = DomainData(train=split("source", cfg.source_train, "source_train"),
                      test=split("source", cfg.source_test, "source_test"))
  target = DomainData(train=split("target", cfg.target_train, "target_train"),
                      test=split("target", cfg.target_test, "target_test"),
                      dev=split("target", cfg.target_dev, "target_dev"))
  return TransferData(source=source, target=target, vocab_size=len(words),
                      image_dim=cfg.image_dim, words=words)


def load_transfer(config) -> TransferData:
  """The `data.name='synthetic'` loader: the benchmark of `config.data.synthetic`."""
  return make_benchmark(config.data.synthetic, config.data.seed)
