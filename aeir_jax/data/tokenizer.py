"""Caption tokenisation, equal to SCAN's `nltk.word_tokenize(caption.lower())` without NLTK.

SCAN (and AECR after it) lowercases a caption and tokenises it with NLTK's `word_tokenize`,
which first splits the text into sentences with the Punkt English model and then applies
NLTK's improved Penn Treebank word rules to each sentence. This module reimplements both steps
for lowercased text, so that vocabularies built by SCAN (`vocab/*_precomp_vocab.json`) map our
tokens to the same ids, and the project needs neither NLTK nor its downloadable `punkt` data.
Checked token for token against NLTK 3.10 (see docs/data.md).

Sentence splitting (`split_sentences`) follows Punkt's decision procedure (Kiss & Strunk 2006)
with the parameters of NLTK's English model, specialised to text without capitals:
  * a candidate boundary is `.`, `?` or `!` followed by whitespace and a token, or by one of
    `) " ; } ] * : @ ' ( { [ ? !`;
  * `?` and `!` end a sentence; a word ending in `.` ends a sentence unless it is a known
    abbreviation (`mr.`, `st.`, `u.s.`, ...), an ellipsis (`..`, `...`) or a word ending in `..`;
  * after an initial (`a.`) or a number (`3.`) a lowercase word or one of `, ; : . ! ?`
    continues the sentence;
    so does any next token after an abbreviation or an ellipsis, because the orthographic and
    sentence-starter heuristics that could split there need a capitalised next word;
  * closing quotes and brackets right after a boundary stay with the sentence they close.
Only lowercase text gets Punkt's exact decisions (captions are lowercased first, as in SCAN);
capitalised words get no orthographic evidence.

Word rules (`treebank_tokenize`), applied in this order to each sentence (NLTK's
`NLTKWordTokenizer`, the rules `word_tokenize` uses):
  Q1 a `"` at the very start becomes the opening quote ``` `` ```; after a space or an opening
     bracket, `"` and `''` become ``` `` ```; runs of backticks and unicode opening quotes are
     separate tokens;
  Q2 an apostrophe that opens a word (not a contraction like 're, 's, 'll) is split from it;
  P1 the final period of a sentence is split off, also when closing quotes or brackets follow
     it (`dog.` -> `dog .`; `dog."` -> `dog . ''`); a period inside the sentence stays attached
     (`st.`, `3.5`, `u.s.`);
  P2 `,` and `:` are split off unless a digit follows (`3,000` and `10:30` stay whole);
  P3 two or more periods form one token (`...`);
  P4 `; @ # $ % &`, unicode dashes, `?`, `!` and `*` are separate tokens;
  P5 brackets `( ) [ ] { } < >` are separate tokens; `--` is a token, a single `-` is not split
     (`t-shirt` stays whole);
  E1 a closing `"` or `''` becomes `''`; unicode closing quotes are separate tokens;
  E2 clitics are split off: `'s 'm 'd 'll 're 've n't` and a final `'` (`dog's` -> `dog 's`,
     `isn't` -> `is n't`, `dogs'` -> `dogs '`);
  C  `cannot gimme gonna gotta lemme more'n wanna d'ye 'tis 'twas` are split in two.

`tokenize(caption, tokenize_bytes_repr_bug=True)` reproduces the reference's Python-3 bug of
tokenising `str(caption_bytes)`, i.e. the text `b'a man .'` (first token `b'a`, an extra final
`'`); see docs/data.md.
"""

from __future__ import annotations

import re
import string

# Punkt English model (NLTK, trained by Kiss & Strunk): abbreviation types (without the final
# period) and the collocations that continue a sentence across a period.
_ABBREVIATIONS = frozenset("""
  a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c c.i.t c.o.m.b
  c.v calif chg cie co col colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g
  f.j feb fla fri ft g g.d g.f g.k ga gen h h.c h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r
  jan jr k kan ky l l.a l.f l.p lt ltd m m.b.a m.d.c m.j maj messrs mg mich minn mr mrs ms n
  n.c n.d n.h n.j n.m n.v n.y nev nov oct ok okla ore p p.a.m p.m pa ph.d prof r r.a r.h r.i
  r.j r.k r.t rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues u.k
  u.n u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr
""".split()) | {". . "}
_COLLOCATIONS = frozenset(
    [("##number##", w) for w in (
        "abreast aes business cbot colgate commodities cooper corrections credit dividend "
        "financing genentech henley insider international leisure letters notable pay-fone "
        "pegasus pepper review rj wedgestone who zimmer").split()]
    + [("b", "edelman"), ("b", "levine"), ("b", "smith"), ("b", "stewart"), ("b", "wigton"),
       ("i", "magnin"), ("i", "toussie"), ("j", "aron"), ("j", "fialka"), ("j", "walter"),
       ("o", "ludcke")])
# The only lowercase types for which the model's orthographic evidence is inconclusive (seen
# lowercase at a sentence start, never capitalised): after an initial or a number they let the
# sentence break stand. Every other lowercase word continues the sentence.
_INCONCLUSIVE_STARTERS = frozenset({"administrators", "b-week", "r-revised", "z-holiday"})

_QUOTE_CHARS = "\u2018\u2019\u201c\u201d\xab\xbb"
_NON_WORD = r"(?:[)\";}\]*:@'({\[" + _QUOTE_CHARS + r"?!])"
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD = re.compile(
    _MULTI_CHAR + r"|(?=[^(\"`{\[:;&#*@)}\]\-,])\S+?(?=\s|$|" + _NON_WORD + "|" + _MULTI_CHAR
    + r"|,(?=$|\s|" + _NON_WORD + "|" + _MULTI_CHAR + r"))|\S")
_CANDIDATE_END = re.compile(r"[.?!](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_REALIGN = re.compile(r"[\"')\]}" + _QUOTE_CHARS + r"]+?(?:\s+|(?=--)|$)", re.MULTILINE)


def _token_type(token: str) -> str:
  return _NUMBER.sub("##number##", token.lower())


def _strip_period(token_type: str) -> str:
  return token_type[:-1] if len(token_type) > 1 and token_type.endswith(".") else token_type


def _first_pass_break(token: str) -> bool:
  """Punkt's type-based guess: does this token end a sentence?"""
  if token in (".", "?", "!"):
    return True
  if not token.endswith(".") or token.endswith(".."):
    return False
  stem = token[:-1].lower()
  return stem not in _ABBREVIATIONS and stem.split("-")[-1] not in _ABBREVIATIONS


def _continues_sentence(token: str, next_token: str, next_breaks: bool) -> bool:
  """Punkt's token-context pass for a period-final `token` guessed as a sentence break."""
  token_type = _strip_period(_token_type(token))
  next_type = _token_type(next_token)
  if next_breaks:
    next_type = _strip_period(next_type)
  if (token_type, next_type) in _COLLOCATIONS:
    return True
  if _INITIAL.match(token) or token_type == "##number##":
    if next_token in tuple(";:,.!?"):
      return True
    return next_token[0].islower() and next_type not in _INCONCLUSIVE_STARTERS
  return False


def _contains_break(context: str) -> bool:
  """True if a sentence ends at some token of `context` that is not its last token."""
  tokens = _PUNKT_WORD.findall(context)
  breaks = [_first_pass_break(t) for t in tokens]
  for i in range(len(tokens) - 1):
    if breaks[i] and not (tokens[i].endswith(".")
                          and _continues_sentence(tokens[i], tokens[i + 1], breaks[i + 1])):
      return True
  return False


def _last_whitespace(text: str) -> int:
  """Index of the last ASCII whitespace in `text`, or 0 if none (Punkt's convention)."""
  for i in range(len(text) - 1, -1, -1):
    if text[i] in string.whitespace:
      return i
  return 0


def _candidate_contexts(text: str):
  """Yields (match, context) for candidate ends, the context being `word + end + next token`.

  A candidate whose preceding word reaches back over the previous candidate replaces it (so
  `!!!` is judged once, at its last mark).
  """
  previous = None
  previous_word = slice(0, 0)
  for match in _CANDIDATE_END.finditer(text):
    last_space = _last_whitespace(text[previous_word.stop:match.start()])
    word_start = previous_word.stop + last_space + 1 if last_space else previous_word.start
    if previous is not None and previous_word.stop <= word_start:
      yield previous, text[previous_word] + previous.group() + previous.group("after")
    previous, previous_word = match, slice(word_start, match.start())
  if previous is not None:
    yield previous, text[previous_word] + previous.group() + previous.group("after")


def split_sentences(text: str) -> list[str]:
  """Splits lowercased text into sentences the way NLTK's English Punkt model does."""
  spans = []
  start = 0
  for match, context in _candidate_contexts(text):
    if _contains_break(context):
      spans.append([start, match.end()])
      start = match.start("next") if match.group("next") else match.end()
  spans.append([start, len(text.rstrip())])
  sentences = []
  shift = 0
  for i, (begin, end) in enumerate(spans):
    begin += shift
    shift = 0
    if i + 1 < len(spans):
      closing = _REALIGN.match(text, spans[i + 1][0], spans[i + 1][1])
      if closing:
        end = spans[i + 1][0] + len(closing.group().rstrip())
        shift = closing.end() - spans[i + 1][0]
    if text[begin:end]:
      sentences.append(text[begin:end])
  return sentences


_CLOSERS = r"\]\)}>\"'" + _QUOTE_CHARS[1::2] + " "
# (needles, pattern, replacement): a rule can only match if the text holds one of its needles
# (lowercase; None = always try). Skipping the others makes tokenisation about 3x faster.
_RULES = [(needles, re.compile(pattern), replacement)
          for needles, pattern, replacement in (
    # Q1 opening quotes.
    (("\xab", "\u201c", "\u2018", "\u201e", "`"), "([\xab\u201c\u2018\u201e]|`+)", r" \1 "),
    (('"',), '^"', "``"),
    (("``",), "(``)", r" \1 "),
    (('"', "''"), "([ (\\[{<])(\"|'{2})", r"\1 `` "),
    # Q2 an apostrophe opening a word that is not a clitic.
    (("'",), r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),
    # P1 the sentence-final period, with the closing quotes/brackets after it.
    ((".",), r"([^.])(\.)([" + _CLOSERS + r"]*+)\s*$", r"\1 \2 \3 "),
    # P2 comma and colon unless a digit follows.
    ((",", ":"), r"([:,])([^\d])", r" \1 \2"),
    ((",", ":"), "([:,])$", r" \1 "),
    # P3 ellipsis; P4 other punctuation.
    (("..",), r"\.{2,}", r" \g<0> "),
    (tuple(";@#$%&"), "[;@#$%&]", r" \g<0> "),
    (tuple("\u2012\u2013\u2014\u2015"), "[\u2012-\u2015]", r" \g<0> "),
    (("?", "!"), "[?!]", r" \g<0> "),
    (("' ",), "([^'])' ", r"\1 ' "),
    (("*",), r"[*]", r" \g<0> "),
    # P5 brackets and double dashes.
    (tuple("[](){}<>"), r"[\]\[(){}<>]", r" \g<0> "),
    (("--",), "--", " -- "),
)]
_ENDING_RULES = [(needles, re.compile(pattern), replacement)
                 for needles, pattern, replacement in (
    # E1 closing quotes.
    (("\xbb", "\u201d", "\u2019"), "([\xbb\u201d\u2019])", r" \1 "),
    (("''",), "''", " '' "),
    (('"',), '"', " '' "),
    (None, r"\s+", " "),
    # E2 clitics.
    (("'",), "([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (("'",), "([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
    # C fused words.
    (("cannot",), r"(?i)\b(can)(not)\b", r" \1 \2 "),
    (("d'ye",), r"(?i)\b(d)('ye)\b", r" \1 \2 "),
    (("gimme",), r"(?i)\b(gim)(me)\b", r" \1 \2 "),
    (("gonna",), r"(?i)\b(gon)(na)\b", r" \1 \2 "),
    (("gotta",), r"(?i)\b(got)(ta)\b", r" \1 \2 "),
    (("lemme",), r"(?i)\b(lem)(me)\b", r" \1 \2 "),
    (("more'n",), r"(?i)\b(more)('n)\b", r" \1 \2 "),
    (("wanna",), r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "),
    ((" 'tis",), r"(?i) ('t)(is)\b", r" \1 \2 "),
    ((" 'twas",), r"(?i) ('t)(was)\b", r" \1 \2 "),
)]


def _apply(rules, text: str) -> str:
  for needles, pattern, replacement in rules:
    lowered = text.lower()
    if needles is None or any(needle in lowered for needle in needles):
      text = pattern.sub(replacement, text)
  return text


def treebank_tokenize(sentence: str) -> list[str]:
  """Splits one sentence into Penn Treebank tokens (rules Q1-C of the module docstring)."""
  return _apply(_ENDING_RULES, " " + _apply(_RULES, sentence) + " ").split()


def word_tokenize(text: str) -> list[str]:
  """NLTK `word_tokenize(text)` for lowercased text: sentences, then Treebank words."""
  return [token for sentence in split_sentences(text) for token in treebank_tokenize(sentence)]


def tokenize(caption: str, tokenize_bytes_repr_bug: bool = False) -> list[str]:
  """Tokens of one caption, as SCAN produces them: lowercase, then `word_tokenize`.

  Args:
    caption: the caption text (already decoded and stripped).
    tokenize_bytes_repr_bug: tokenise `str(caption.encode('utf-8'))` instead, as the
      reference does under Python 3 (e.g. `"b'a"` ... `"'"`); off for clean runs.

  Returns:
    the list of tokens.
  """
  text = str(caption.encode("utf-8")) if tokenize_bytes_repr_bug else caption
  return word_tokenize(text.lower())
