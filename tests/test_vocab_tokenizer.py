"""Tokenizer (NLTK word_tokenize on lowercased captions) and vocabulary.

Expected tokens are derived by hand from the rules named in `aeir_jax.data.tokenizer`'s
docstring (Punkt sentence split, then Treebank rules Q1-C); the rule is given per case.
"""

import json

import numpy as np
import pytest

from aeir_jax.data.tokenizer import split_sentences, tokenize, treebank_tokenize
from aeir_jax.data.vocab import END, PAD, SPECIAL_TOKENS, START, UNK, Vocab
from aeir_jax.errors import DataError

CASES = [
    # P1: only the sentence-final period is split off.
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse", "."]),
    # P2: commas followed by a space are split.
    ("Two dogs , one brown , play .", ["two", "dogs", ",", "one", "brown", ",", "play", "."]),
    # E2: clitics 's and n't.
    ("The dog's owner isn't here.", ["the", "dog", "'s", "owner", "is", "n't", "here", "."]),
    # E2 're / 'll, P4 ';'.
    ("They're playing; we'll watch.",
     ["they", "'re", "playing", ";", "we", "'ll", "watch", "."]),
    # Q1: '"' after a space opens (``); E1: the other '"' closes ('').
    ('A sign reads "stop" .', ["a", "sign", "reads", "``", "stop", "''", "."]),
    # Q1: '"' at the very start opens.
    ('"Hello" said the man.', ["``", "hello", "''", "said", "the", "man", "."]),
    # P5: a single hyphen is not split.
    ("A girl in a t-shirt and a well-worn hat.",
     ["a", "girl", "in", "a", "t-shirt", "and", "a", "well-worn", "hat", "."]),
    # P2: ',' and ':' before a digit stay; P4: '$'; P1: inner periods stay, the final one not.
    ("A 1,000-piece puzzle costs $3.50 at 10:30.",
     ["a", "1,000-piece", "puzzle", "costs", "$", "3.50", "at", "10:30", "."]),
    # P3: an ellipsis is one token; Punkt: an ellipsis does not end a sentence.
    ("A dog waits... then runs.", ["a", "dog", "waits", "...", "then", "runs", "."]),
    # Punkt: 'sits.' ends a sentence, so P1 splits its period too.
    ("A man sits. A dog runs.", ["a", "man", "sits", ".", "a", "dog", "runs", "."]),
    # Punkt: 'mr.' and 'st.' are abbreviations (no break), so their periods stay.
    ("Mr. Smith walks down St. Mark's street.",
     ["mr.", "smith", "walks", "down", "st.", "mark", "'s", "street", "."]),
    # Punkt: '?' ends a sentence; P4 splits '?' and '!'.
    ("What is it? A ball!", ["what", "is", "it", "?", "a", "ball", "!"]),
    # C: cannot -> can not, gonna -> gon na.
    ("I cannot believe they're gonna win",
     ["i", "can", "not", "believe", "they", "'re", "gon", "na", "win"]),
    # P5: brackets and '--'.
    ("A cat (black) sits--waiting", ["a", "cat", "(", "black", ")", "sits", "--", "waiting"]),
    # P1 with a closing quote after the final period; Q1/E1 for the quotes.
    ('He said "go."', ["he", "said", "``", "go", ".", "''"]),
    # E2: a word-final apostrophe (plural possessive).
    ("The dogs' toys", ["the", "dogs", "'", "toys"]),
    # Q2: an apostrophe opening a non-clitic word is split from it.
    ("Go get 'em", ["go", "get", "'", "em"]),
    # P2: a comma before a space.
    ("A group of 3, playing", ["a", "group", "of", "3", ",", "playing"]),
    # Punkt: 'no.' is not a known abbreviation and '5' is no lowercase word: a sentence break.
    ("A no. 5 jersey .", ["a", "no", ".", "5", "jersey", "."]),
    # Punkt: an initial followed by a lowercase word continues the sentence.
    ("The letter J. on a sign", ["the", "letter", "j.", "on", "a", "sign"]),
    # Punkt: '!' ends a sentence and the closing '"' realigns to it; Q1 turns that '"' (after a
    # space) into ``, as NLTK does (a real Flickr8k caption).
    ('A boy making an " oh ! " face .',
     ["a", "boy", "making", "an", "``", "oh", "!", "``", "face", "."]),
]

BUG_CASES = [
    # str(b'...'): 'b' glues to the first word; P1 splits '.' and the closing "'".
    ("A man riding a horse .", ["b'a", "man", "riding", "a", "horse", ".", "'"]),
    # An apostrophe makes Python quote with "...": E1 turns both '"' into ''.
    ("The dog's toy .", ["b", "''", "the", "dog", "'s", "toy", ".", "''"]),
    # Non-ASCII bytes appear as escapes.
    ("Caf\u00e9 .", ["b'caf\\xc3\\xa9", ".", "'"]),
]


@pytest.mark.parametrize("caption,expected", CASES)
def test_tokenize_matches_treebank_rules(caption, expected):
  assert tokenize(caption) == expected


@pytest.mark.parametrize("caption,expected", BUG_CASES)
def test_tokenize_bytes_repr_bug(caption, expected):
  assert tokenize(caption, tokenize_bytes_repr_bug=True) == expected


def test_sentence_split_and_single_sentence_rules():
  assert split_sentences("a man sits. a dog runs.") == ["a man sits.", "a dog runs."]
  assert split_sentences("mr. smith is here .") == ["mr. smith is here ."]
  assert split_sentences('an " oh ! " face') == ['an " oh ! "', "face"]
  # Without the sentence split, an inner period stays attached (the Treebank rule alone).
  assert treebank_tokenize("a man sits. a dog runs.") == [
      "a", "man", "sits.", "a", "dog", "runs", "."]


def _scan_json(words):
  return {"word2idx": {w: i for i, w in enumerate(words)},
          "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}


def test_vocab_build_threshold_and_order():
  captions = ["A dog runs .", "A dog sits .", "A cat runs .", "a dog ."]
  vocab = Vocab.build(captions, threshold=2)
  assert vocab.words == list(SPECIAL_TOKENS) + ["a", "dog", "runs", "."]
  assert len(Vocab.build(captions, threshold=1)) == 4 + 6


def test_encode_and_encode_batch():
  vocab = Vocab(list(SPECIAL_TOKENS) + ["a", "dog", "runs", "."])
  assert vocab.encode("A dog flies .") == [START, 4, 5, UNK, 7, END]
  ids, lengths = vocab.encode_batch(["A dog runs .", "a", "a dog"], max_len=6)
  assert ids.dtype == np.int32 and lengths.dtype == np.int32
  np.testing.assert_array_equal(ids, [[START, 4, 5, 6, 7, END],
                                      [START, 4, END, PAD, PAD, PAD],
                                      [START, 4, 5, END, PAD, PAD]])
  np.testing.assert_array_equal(lengths, [6, 3, 4])
  # Too long for 5 ids: the first 4 are kept and the row still ends with <end>.
  ids, lengths = vocab.encode_batch(["A dog runs ."], max_len=5)
  np.testing.assert_array_equal(ids, [[START, 4, 5, 6, END]])
  np.testing.assert_array_equal(lengths, [5])
  assert vocab.decode(ids[0]) == ["<start>", "a", "dog", "runs", "<end>"]
  with pytest.raises(ValueError):
    vocab.encode_batch(["a"], max_len=1)


def test_encode_with_bytes_repr_bug():
  vocab = Vocab(list(SPECIAL_TOKENS) + ["a", "man", ".", "'"], tokenize_bytes_repr_bug=True)
  assert vocab.encode("A man .") == [START, UNK, 5, 6, 7, END]


def test_save_load_round_trip_in_scan_format(tmp_path):
  vocab = Vocab.build(["A dog runs .", "A dog runs ."], threshold=2)
  path = tmp_path / "vocab.json"
  vocab.save(str(path))
  content = json.loads(path.read_text())
  assert content == _scan_json(vocab.words)
  assert Vocab.load(str(path)).words == vocab.words
  content["idx2word"] = vocab.words  # some exports store idx2word as a list
  path.write_text(json.dumps(content))
  assert Vocab.load(str(path)).words == vocab.words


@pytest.mark.parametrize("change,message", [
    (lambda c: c["word2idx"].pop("<unk>"), "<unk>"),
    (lambda c: c["word2idx"].update({"<start>": 5, "dog": 1}), "<start>"),
    (lambda c: c.pop("word2idx"), "word2idx"),
    (lambda c: c["idx2word"].update({"4": "cat"}), "idx2word"),
    (lambda c: c.update({"idx": 9}), "'idx'"),
    (lambda c: c["word2idx"].update({"dog": 7}), "ids"),
])
def test_load_rejects_inconsistent_files(tmp_path, change, message):
  content = _scan_json(list(SPECIAL_TOKENS) + ["dog", "."])
  change(content)
  path = tmp_path / "vocab.json"
  path.write_text(json.dumps(content))
  with pytest.raises(DataError, match=message) as error:
    Vocab.load(str(path))
  assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_rejects_missing_and_broken_files(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    Vocab.load(str(tmp_path / "none.json"))
  path = tmp_path / "broken.json"
  path.write_text("{not json")
  with pytest.raises(DataError, match="not valid UTF-8 JSON"):
    Vocab.load(str(path))
