"""Word vocabulary in the SCAN/AECR format, and caption -> token id encoding.

File format (SCAN's `serialize_vocab`, used by AECR's `vocab/*_precomp_vocab.json`): one JSON
object with `word2idx` (word -> id), `idx2word` (id as a string -> word) and `idx` (the number
of words). Ids 0-3 are the special tokens `<pad>`, `<start>`, `<end>`, `<unk>`.

Encoding (SCAN's collate): a caption becomes `[<start>] + ids(tokens) + [<end>]`, unknown words
map to `<unk>`, and batches are padded with `<pad>` = 0. Lengths count `<start>` and `<end>`.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

import numpy as np

from aeir_jax.data.tokenizer import tokenize
from aeir_jax.errors import DataError

PAD, START, END, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")


class Vocab:
  """A word <-> id table whose first four ids are `SPECIAL_TOKENS`.

  Attributes:
    words: id -> word list.
    tokenize_bytes_repr_bug: whether captions are tokenised with the reference's bug (see
      `aeir_jax.data.tokenizer.tokenize`).
  """

  def __init__(self, words: Sequence[str], tokenize_bytes_repr_bug: bool = False):
    if tuple(words[:4]) != SPECIAL_TOKENS:
      raise ValueError(f"the first four words must be {SPECIAL_TOKENS}, got {tuple(words[:4])}")
    self.words = list(words)
    self.word2idx = {word: i for i, word in enumerate(self.words)}
    if len(self.word2idx) != len(self.words):
      raise ValueError("the vocabulary holds a word twice")
    self.tokenize_bytes_repr_bug = tokenize_bytes_repr_bug

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: str) -> bool:
    return word in self.word2idx

  def __call__(self, word: str) -> int:
    """Id of a word, `<unk>` (3) if unknown."""
    return self.word2idx.get(word, UNK)

  def tokens(self, caption: str) -> list[str]:
    """Tokens of a caption, with this vocabulary's tokenisation."""
    return tokenize(caption, self.tokenize_bytes_repr_bug)

  def encode(self, caption: str) -> list[int]:
    """Token ids `[<start>, ids..., <end>]` of one caption."""
    return [START] + [self(token) for token in self.tokens(caption)] + [END]

  def encode_batch(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes captions into a fixed-width id matrix.

    A caption longer than `max_len` ids (with `<start>` and `<end>`) keeps its first
    `max_len - 1` ids and ends with `<end>`, so every row still ends the sentence.

    Args:
      captions: N caption strings.
      max_len: the width L of the result, >= 2.

    Returns:
      ids `[N, L]` int32 padded with 0, and lengths `[N]` int32 (2 <= length <= L).
    """
    if max_len < 2:
      raise ValueError(f"max_len must be at least 2 (<start> and <end>), got {max_len}")
    ids = np.zeros((len(captions), max_len), np.int32)
    lengths = np.zeros((len(captions),), np.int32)
    for row, caption in enumerate(captions):
      encoded = self.encode(caption)
      if len(encoded) > max_len:
        encoded = encoded[:max_len - 1] + [END]
      ids[row, :len(encoded)] = encoded
      lengths[row] = len(encoded)
    return ids, lengths

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Words of an id sequence, stopping at the first padding id."""
    words = []
    for i in ids:
      if i == PAD:
        break
      words.append(self.words[i])
    return words

  @classmethod
  def build(cls, train_captions: Iterable[str], threshold: int = 4,
            tokenize_bytes_repr_bug: bool = False) -> "Vocab":
    """Builds a vocabulary from training captions: words seen at least `threshold` times.

    Only pass the TRAIN split: SCAN also counted its dev captions, which leaks dev words into
    the vocabulary. Words keep their order of first occurrence, as in SCAN.
    """
    counts = collections.Counter()
    for caption in train_captions:
      counts.update(tokenize(caption, tokenize_bytes_repr_bug))
    kept = [word for word, count in counts.items()
            if count >= threshold and word not in SPECIAL_TOKENS]
    return cls(list(SPECIAL_TOKENS) + kept, tokenize_bytes_repr_bug)

  @classmethod
  def load(cls, path: str, tokenize_bytes_repr_bug: bool = False) -> "Vocab":
    """Reads a SCAN/AECR vocabulary json, checking that it is consistent."""
    try:
      with open(path, encoding="utf-8") as f:
        content = json.load(f)
    except FileNotFoundError:
      raise DataError(f"vocabulary file {path} does not exist; pass the path of a SCAN/AECR "
                      "*_vocab.json or build one from the train captions") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"vocabulary file {path} is not valid UTF-8 JSON ({e}); replace it "
                      "with a SCAN/AECR *_vocab.json") from None
    fix = "rebuild it with Vocab.build(...).save(path) or use the file from the AECR repo"
    if not isinstance(content, dict) or "word2idx" not in content:
      raise DataError(f"vocabulary file {path} has no 'word2idx' table; {fix}")
    word2idx = content["word2idx"]
    if not isinstance(word2idx, dict) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in word2idx.values()):
      raise DataError(f"vocabulary file {path}: 'word2idx' must map words to integer ids; {fix}")
    for i, token in enumerate(SPECIAL_TOKENS):
      if word2idx.get(token) != i:
        raise DataError(f"vocabulary file {path}: special token {token} must have id {i}, "
                        f"found {word2idx.get(token, 'none')}; {fix}")
    words = [None] * len(word2idx)
    for word, i in word2idx.items():
      if not 0 <= i < len(words) or words[i] is not None:
        raise DataError(f"vocabulary file {path}: ids in 'word2idx' must be 0..{len(words) - 1} "
                        f"without repeats, word {word!r} has id {i}; {fix}")
      words[i] = word
    idx2word = content.get("idx2word")
    if isinstance(idx2word, list):
      idx2word = dict(enumerate(idx2word))
    if idx2word is not None and (
        not isinstance(idx2word, dict)
        or {str(i): w for i, w in enumerate(words)} != {str(k): v for k, v in idx2word.items()}):
      raise DataError(f"vocabulary file {path}: 'idx2word' disagrees with 'word2idx'; {fix}")
    if content.get("idx", len(words)) != len(words):
      raise DataError(f"vocabulary file {path}: 'idx' is {content['idx']} but there are "
                      f"{len(words)} words; {fix}")
    return cls(words, tokenize_bytes_repr_bug)

  def save(self, path: str) -> None:
    """Writes the vocabulary as SCAN/AECR json (`word2idx`, `idx2word`, `idx`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    content = {"word2idx": self.word2idx,
               "idx2word": {str(i): word for i, word in enumerate(self.words)},
               "idx": len(self.words)}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(content, f)
