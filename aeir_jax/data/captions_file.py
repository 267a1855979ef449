"""Captions, split lists and domain tables for a folder of images (e.g. Flickr8k).

Caption files, detected from their first line:
  * Flickr8k token format: `name.jpg#i<TAB>caption`, i = caption number of the image;
  * CSV (`.csv`) or TSV (any other name) with the header `image,caption[,domain]`, one caption
    per row, captions of an image in file order.
Split files list one image file name per line. A domain table is a TSV with a header holding
at least `image` and `domain` (and usually `official_split`), e.g. Flickr8k's
`domain_split.tsv` (`image, official_split, domain, n_captions_with_animal_word`).

Stray lines: the real Flickr8k token file has a caption keyed `2258277193_586949ec62.jpg.1#0`,
a typo of `...jpg#0`, for an image that is not among the 8,091 released photos. A key whose name
does not end in an image extension (.jpg, .jpeg, .png, .bmp, .gif, .webp) is skipped with one
warning that gives its line numbers. Its image is then left with 4 captions; since that image is
in no split, reading with `images=` (a split) never sees it, while reading the whole file
reports it unless `on_incomplete="drop"`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import warnings
from typing import Iterable, Optional

from aeir_jax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class ImageCaptions:
  """Captions grouped by image.

  Attributes:
    names: N image file names, in the order asked for (or of first appearance in the file).
    captions: N lists of captions_per_image strings.
    domains: N domain labels when the caption file has a `domain` column, else None.
  """

  names: list
  captions: list
  domains: Optional[list] = None

  def flat_captions(self) -> list:
    """The N * captions_per_image captions, image by image (caption c is of image c // cpi)."""
    return [caption for group in self.captions for caption in group]


@dataclasses.dataclass
class DomainTable:
  """Rows of a domain TSV: per image its domain and (if the column exists) its split.

  Attributes:
    names: image file names in file order.
    domains: domain label per image.
    splits: split label per image (`official_split` column), or None.
  """

  names: list
  domains: list
  splits: Optional[list] = None

  def select(self, split: Optional[str] = None, domain: Optional[str] = None) -> list:
    """Names of the images in `split` (if given) and `domain` (if given), in file order."""
    if split is not None and self.splits is None:
      raise DataError("the domain table has no 'official_split' column; pass split files "
                      "instead of selecting by split")
    return [name for i, name in enumerate(self.names)
            if (split is None or self.splits[i] == split)
            and (domain is None or self.domains[i] == domain)]


def _read_lines(path: str, what: str) -> list:
  """(line number, text) of every line of a UTF-8 file, newline removed."""
  try:
    with open(path, "rb") as f:
      content = f.read()
  except FileNotFoundError:
    raise DataError(f"{what} {path} does not exist; check the path") from None
  lines = []
  for number, raw in enumerate(content.split(b"\n"), start=1):
    try:
      lines.append((number, raw.rstrip(b"\r").decode("utf-8")))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                      "re-encode the file as UTF-8") from None
  if lines and not lines[-1][1].strip():
    lines.pop()
  return lines


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _parse_token_lines(path: str, lines: list) -> list:
  """(line, image, caption number, caption) rows of a Flickr8k-style token file."""
  rows, stray = [], []
  for number, line in lines:
    key, tab, caption = line.partition("\t")
    name, hash_sign, index = key.strip().rpartition("#")
    if not tab or not hash_sign or not index.isdigit():
      raise DataError(f"{path}:{number}: expected 'name.jpg#i<TAB>caption', got {line[:60]!r}; "
                      "fix the line or use a CSV with header image,caption")
    if not _is_image_name(name):
      stray.append(number)
      continue
    rows.append((number, name, int(index), caption.strip(), None))
  if stray:
    warnings.warn(f"{path}: skipped {len(stray)} line(s) whose key is not an image file name "
                  f"(lines {', '.join(map(str, stray[:10]))}); fix the key if the caption "
                  "belongs to an image", stacklevel=3)
  return rows


def _parse_table_lines(path: str, lines: list) -> list:
  """(line, image, caption number, caption, domain) rows of a CSV/TSV caption file."""
  delimiter = "," if path.lower().endswith(".csv") else "\t"
  reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)), delimiter=delimiter)
  header = [field.strip().lower() for field in next(reader, [])]
  if header not in (["image", "caption"], ["image", "caption", "domain"]):
    raise DataError(f"{path}:1: header is {header}, expected image,caption or "
                    "image,caption,domain (separated by "
                    f"{'commas' if delimiter == ',' else 'tabs'}); fix the header")
  rows, counts = [], {}
  for record in reader:
    number = lines[reader.line_num - 1][0]
    if not any(field.strip() for field in record):
      continue
    if len(record) != len(header):
      raise DataError(f"{path}:{number}: {len(record)} fields, expected {len(header)} "
                      f"({','.join(header)}); quote captions that contain the separator")
    name = record[0].strip()
    counts[name] = counts.get(name, 0) + 1
    domain = record[2].strip() if len(header) == 3 else None
    rows.append((number, name, counts[name] - 1, record[1].strip(), domain))
  return rows


def read_captions_file(path: str, captions_per_image: Optional[int] = 5,
                       images: Optional[Iterable[str]] = None,
                       on_incomplete: str = "error") -> ImageCaptions:
  """Reads a caption file and groups its captions by image.

  Args:
    path: Flickr8k token file, or CSV/TSV with header `image,caption[,domain]`.
    captions_per_image: captions each image must have; None accepts any number >= 1.
    images: if given, only these images, in this order; each must be in the file.
    on_incomplete: "error" or "drop" (with a warning) for images whose caption count is not
      `captions_per_image` (among `images` if given, it is always an error).

  Returns:
    ImageCaptions; captions of an image ordered by their number (token format) or file order.
  """
  if on_incomplete not in ("error", "drop"):
    raise ValueError(f"on_incomplete must be 'error' or 'drop', got {on_incomplete!r}")
  lines = _read_lines(path, "caption file")
  if not lines:
    raise DataError(f"caption file {path} is empty; point to the captions of the images")
  first = lines[0][1]
  token_format = "\t" in first and "#" in first.partition("\t")[0]
  rows = _parse_token_lines(path, lines) if token_format else _parse_table_lines(path, lines)
  grouped, line_numbers, domains = {}, {}, {}
  for number, name, index, caption, domain in rows:
    if not caption:
      raise DataError(f"{path}:{number}: empty caption for {name}; fill it in or remove the "
                      "line")
    if index in grouped.setdefault(name, {}):
      raise DataError(f"{path}:{number}: caption {name}#{index} repeats line "
                      f"{line_numbers[name][index]}; remove one of them")
    grouped[name][index] = caption
    line_numbers.setdefault(name, {})[index] = number
    if domains.setdefault(name, domain) != domain:
      raise DataError(f"{path}:{number}: domain {domain!r} of {name} differs from "
                      f"{domains[name]!r} on an earlier line; give each image one domain")
  wanted = list(images) if images is not None else list(grouped)
  names, captions = [], []
  for name in wanted:
    if name not in grouped:
      raise DataError(f"caption file {path} has no captions for image {name}; check that the "
                      "split/image list and the caption file belong together")
    group = [grouped[name][i] for i in sorted(grouped[name])]
    if captions_per_image is not None and len(group) != captions_per_image:
      where = sorted(line_numbers[name].values())
      if images is not None or on_incomplete == "error":
        raise DataError(f"{path}: image {name} has {len(group)} captions (lines "
                        f"{where[0]}-{where[-1]}), expected {captions_per_image}; fix the file, "
                        "read only the images of a split, or pass on_incomplete='drop'")
      warnings.warn(f"{path}: dropped image {name} with {len(group)} captions (lines "
                    f"{where[0]}-{where[-1]}), expected {captions_per_image}", stacklevel=2)
      continue
    names.append(name)
    captions.append(group)
  has_domains = not token_format and any(d is not None for d in domains.values())
  return ImageCaptions(names=names, captions=captions,
                       domains=[domains[name] for name in names] if has_domains else None)


def read_split_file(path: str) -> list:
  """Image names of a split file (one per line), checked for blanks and repeats."""
  names, seen = [], {}
  for number, line in _read_lines(path, "split file"):
    name = line.strip()
    if not name:
      raise DataError(f"{path}:{number}: empty line; a split file lists one image name per "
                      "line, remove blank lines")
    if name in seen:
      raise DataError(f"{path}:{number}: image {name} repeats line {seen[name]}; remove one")
    seen[name] = number
    names.append(name)
  if not names:
    raise DataError(f"split file {path} is empty; list one image name per line")
  return names


def read_domain_table(path: str) -> DomainTable:
  """Reads a TSV with header columns `image`, `domain` and optionally `official_split`."""
  lines = _read_lines(path, "domain table")
  if not lines:
    raise DataError(f"domain table {path} is empty; it needs a header with image and domain")
  header = [field.strip().lower() for field in lines[0][1].split("\t")]
  if "image" not in header or "domain" not in header:
    raise DataError(f"{path}:1: header {header} lacks 'image' and/or 'domain' (tab-separated); "
                    "add the columns")
  image_col, domain_col = header.index("image"), header.index("domain")
  split_col = header.index("official_split") if "official_split" in header else None
  names, domains, splits, seen = [], [], [], {}
  for number, line in lines[1:]:
    fields = [field.strip() for field in line.split("\t")]
    if len(fields) != len(header) or not fields[image_col] or not fields[domain_col]:
      raise DataError(f"{path}:{number}: expected {len(header)} tab-separated fields with an "
                      f"image and a domain, got {line[:60]!r}; fix the row")
    name = fields[image_col]
    if name in seen:
      raise DataError(f"{path}:{number}: image {name} repeats line {seen[name]}; remove one")
    seen[name] = number
    names.append(name)
    domains.append(fields[domain_col])
    if split_col is not None:
      splits.append(fields[split_col])
  return DomainTable(names=names, domains=domains,
                     splits=splits if split_col is not None else None)


def check_images_exist(names: Iterable[str], images_dir: str) -> None:
  """Raises DataError naming the first listed image missing from `images_dir`."""
  if not os.path.isdir(images_dir):
    raise DataError(f"image folder {images_dir} does not exist; check the path")
  present = set(os.listdir(images_dir))
  missing = [name for name in names if name not in present]
  if missing:
    raise DataError(f"{len(missing)} listed image(s) are missing from {images_dir}, e.g. "
                    f"{missing[0]}; add the files or remove them from the split")
