"""One self-contained HTML report of a run (or of a sweep of runs), readable offline.

    python -m aeir_jax.report WORKDIR [--out WORKDIR/report.html] [--images DIR ...]

A run's page (from the workdir layout of `aeir_jax.artifacts`):
  * status and facts (finished when results.json exists; else the last logged step);
  * the final metrics table (R@1/5/10 both directions, rSum, median ranks, per split);
  * training curves: every loss term, discriminator accuracy per modality, rSum per split;
  * domain alignment: per modality, a 2-D PCA of the source and target pooled embeddings
    (fitted on their union at that step), start and end of training side by side;
  * retrieval examples on the target test split (top-5 images per query sentence, top-5
    sentences per query image, the correct ones marked), with thumbnails when an image id
    names an image file (absolute, or under an --images folder, a `*image*_dir` config value,
    or the workdir).
A sweep's page (a folder with sweep.json, read by `aeir_jax.sweep.collect`; or any folder
whose subfolders hold runs, grouped by config but the seed): the comparison tables (mean and
sample std over seeds per setting and split), a bar chart of rSum, and every run's status.

Every picture is a PNG embedded as a data URI (no external files, scripts or styles); the
plots are also written beside the HTML, in `<out stem>/` (`WORKDIR/report/*.png` by default).
Plots use Matplotlib's Agg canvas. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aeir_jax import sweep
from aeir_jax.errors import DataError, UserError, WorkdirError
from aeir_jax.logging_lib import read_metrics

METRIC_COLUMNS = (("i2t_r1", "I→T R@1"), ("i2t_r5", "I→T R@5"), ("i2t_r10", "I→T R@10"),
                  ("t2i_r1", "T→I R@1"), ("t2i_r5", "T→I R@5"), ("t2i_r10", "T→I R@10"),
                  ("rsum", "rSum"), ("i2t_medr", "I→T medr"), ("t2i_medr", "T→I medr"))
LOSS_PANELS = (
    ("source triplet", ("loss/triplet",)),
    ("adversarial (encoders)", ("loss/adv_image", "loss/adv_caption")),
    ("discriminators", ("loss/disc_image", "loss/disc_caption")),
    ("structural (top-K KL)", ("loss/struct_img2cap", "loss/struct_cap2img")),
)
CHANCE_LOSS = 2 * math.log(2)   # a discriminator that outputs 1/2 on both domains
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
THUMBNAIL_SIZE = 112
DOMAIN_COLORS = {"source": "tab:blue", "target": "tab:orange"}

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f6f7f9;
color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:1.6em;margin:.3em 0}h2{border-bottom:2px solid #d8dce3;padding-bottom:4px;
margin:.6em 0}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:6px 18px 16px;
margin:16px 0;overflow-x:auto}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}
th,td{border:1px solid #d8dce3;padding:3px 6px;text-align:right}td{white-space:nowrap}
th{background:#eef1f5}td:first-child,th:first-child,.l{text-align:left}
img.plot{max-width:100%;display:block;margin:8px 0}
.note{background:#fff6db;border:1px solid #f0d78c;padding:8px 12px;border-radius:6px}
.muted{color:#6b7280}.facts td{text-align:left}
.query{display:flex;gap:12px;align-items:flex-start;border-top:1px solid #eceef2;padding:10px 0}
.qtext{width:220px;flex:none;font-weight:600}
.tiles{display:flex;gap:8px;flex-wrap:wrap}
.tile{width:118px;border:3px solid #d0d4db;border-radius:6px;padding:3px;font-size:.78em;
background:#fafbfc;text-align:center;overflow-wrap:anywhere}
.tile.ok,li.ok{border-color:#16a34a}.tile img{display:block;margin:0 auto 2px}
.idbox{height:64px;display:flex;align-items:center;justify-content:center;background:#e9ecf1;
border-radius:4px;margin-bottom:2px}
ol.caps{margin:0;padding-left:22px}ol.caps li{padding:2px 6px;border-left:4px solid transparent}
li.ok{background:#eafbef}.mark{color:#16a34a;font-weight:700}
"""


# ----------------------------------------------------------------------------- reading


def _read_json(path: str):
  """A JSON file, or None when it is absent; a malformed one is a DataError."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path} is not valid JSON ({e}); restore it or delete it and rerun "
                    "the step that writes it") from None


def _is_run(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, name))
             for name in ("config.json", "metrics.jsonl", "results.json"))


def find_runs(root: str, max_depth: int = 3) -> list[str]:
  """Run folders below `root` (relative paths, sorted): folders holding config.json or
  results.json; a run's own subfolders are not searched."""
  runs = []
  for dirpath, dirnames, _ in os.walk(root):
    depth = os.path.relpath(dirpath, root).count(os.sep) + 1
    if dirpath != root and _is_run(dirpath):
      runs.append(os.path.relpath(dirpath, root))
      dirnames[:] = []
    elif depth >= max_depth:
      dirnames[:] = []
    dirnames.sort()
  return sorted(runs)


def _splits(results: dict, config: Optional[dict]) -> list[str]:
  """Evaluated splits in the config's order (then any others), from `split/metric` keys."""
  present = {k.split("/", 1)[0] for k in results if "/" in k}
  order = list((config or {}).get("eval", {}).get("splits", []))
  return [s for s in order if s in present] + sorted(present - set(order))


def _embedding_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "embeddings")
  if not os.path.isdir(folder):
    return []
  steps = []
  for name in os.listdir(folder):
    stem, ext = os.path.splitext(name)
    if ext == ".npz" and stem.startswith("step_") and stem[5:].isdigit():
      steps.append(int(stem[5:]))
  return sorted(steps)


def _load_embeddings(workdir: str, step: int) -> dict:
  path = os.path.join(workdir, "embeddings", f"step_{step}.npz")
  try:
    with np.load(path) as npz:
      return {k: np.asarray(npz[k], np.float64) for k in npz.files}
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is not a readable .npz ({e}); delete it to leave it out of "
                    "the report") from None


# ----------------------------------------------------------------------------- plots


class _Images:
  """Collects PNGs: saves each plot beside the HTML and returns its <img> tag."""

  def __init__(self, folder: str):
    self.folder = folder
    self.saved = []

  def plot(self, fig: Figure, name: str, alt: str) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100)
    data = buf.getvalue()
    os.makedirs(self.folder, exist_ok=True)
    path = os.path.join(self.folder, f"{name}.png")
    with open(path, "wb") as f:
      f.write(data)
    self.saved.append(path)
    return _img_tag(data, alt, "plot")


def _img_tag(png: bytes, alt: str, cls: str = "") -> str:
  uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
  cls_attr = f' class="{cls}"' if cls else ""
  return f'<img{cls_attr} alt="{html.escape(alt)}" src="{uri}">'


def _series(records: list[dict], key: str):
  pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def loss_figure(train: list[dict]) -> Figure:
  """Every loss term over training steps, one panel per group."""
  fig = Figure(figsize=(11, 6.6), layout="constrained")
  axes = fig.subplots(2, 2).ravel()
  for ax, (title, keys) in zip(axes, LOSS_PANELS):
    for key in keys:
      steps, values = _series(train, key)
      if steps:
        ax.plot(steps, values, marker="." if len(steps) < 30 else None,
                label=key.split("/", 1)[1])
    if "adversarial" in title or "discriminators" in title:
      ax.axhline(CHANCE_LOSS, color="grey", ls="--", lw=1, label="chance (2 ln 2)")
    ax.set_title(title)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  return fig


def accuracy_figure(train: list[dict]) -> Figure:
  """Discriminator accuracy per modality (0.5 = domains indistinguishable)."""
  fig = Figure(figsize=(11, 3.4), layout="constrained")
  ax = fig.subplots()
  for key, label in (("disc/acc_image", "image"), ("disc/acc_caption", "caption")):
    steps, values = _series(train, key)
    if steps:
      ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
  ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("discriminator accuracy per modality")
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def rsum_figure(evals: list[dict], splits: list[str]) -> Figure:
  """rSum of every evaluated split over evaluation steps."""
  fig = Figure(figsize=(11, 3.4), layout="constrained")
  ax = fig.subplots()
  for split in splits:
    steps, values = _series(evals, f"{split}/rsum")
    if steps:
      ax.plot(steps, values, marker="o", label=split)
  ax.set_title("rSum over evaluations")
  ax.set_xlabel("step")
  ax.set_ylabel("rSum")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def pca_2d(x: np.ndarray):
  """Projects the rows of `x` on its first two principal axes; returns (points, explained
  variance ratios)."""
  centred = x - x.mean(axis=0, keepdims=True)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  var = s ** 2
  ratio = var / max(var.sum(), 1e-12)
  k = min(2, vt.shape[0])
  points = centred @ vt[:k].T
  if k < 2:
    points = np.pad(points, ((0, 0), (0, 2 - k)))
    ratio = np.pad(ratio, (0, 2 - k))
  return points, ratio[:2]


def alignment_figure(modality: str, snapshots: list[tuple[str, dict]]) -> Figure:
  """Source vs target pooled embeddings of one modality, one PCA panel per snapshot."""
  fig = Figure(figsize=(5.5 * len(snapshots), 4.8), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(snapshots)))
  for ax, (title, emb) in zip(axes, snapshots):
    src, tgt = emb[f"{modality}_source"], emb[f"{modality}_target"]
    points, ratio = pca_2d(np.concatenate([src, tgt]))
    for domain, pts in (("source", points[:len(src)]), ("target", points[len(src):])):
      ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.6, color=DOMAIN_COLORS[domain],
                 label=f"{domain} ({len(pts)})")
    gap = float(np.linalg.norm(src.mean(axis=0) - tgt.mean(axis=0)))
    ax.set_title(f"{title}\n‖mean(source) − mean(target)‖ = {gap:.3f}", fontsize=10)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
    ax.legend(fontsize=8, markerscale=1.5)
    ax.grid(alpha=0.3)
  fig.suptitle(f"{modality} embeddings: source vs target (PCA on their union)")
  return fig


# ----------------------------------------------------------------------------- html pieces


def _fmt(v) -> str:
  return "–" if v is None else f"{v:.1f}"


def metrics_table(results: dict, splits: list[str]) -> str:
  head = "".join(f"<th>{html.escape(label)}</th>" for _, label in METRIC_COLUMNS)
  rows = "".join(
      f"<tr><td>{html.escape(s)}</td>"
      + "".join(f"<td>{_fmt(results.get(f'{s}/{c}'))}</td>" for c, _ in METRIC_COLUMNS)
      + "</tr>" for s in splits)
  return f"<table><tr><th>split</th>{head}</tr>{rows}</table>"


def _note(text: str) -> str:
  return f'<p class="note">{html.escape(text)}</p>'


class _Thumbnails:
  """PNG thumbnails of image ids that name image files, cached per path."""

  def __init__(self, folders: Sequence[str]):
    self.folders = [f for f in folders if f]
    self._cache = {}

  def resolve(self, image_id: str) -> Optional[str]:
    if not isinstance(image_id, str) or not image_id.lower().endswith(IMAGE_EXTENSIONS):
      return None
    candidates = [image_id] if os.path.isabs(image_id) else [
        os.path.join(folder, image_id) for folder in self.folders]
    return next((c for c in candidates if os.path.isfile(c)), None)

  def tag(self, image_id: str) -> Optional[str]:
    path = self.resolve(image_id)
    if path is None:
      return None
    if path not in self._cache:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      try:
        with Image.open(path) as im:
          im = im.convert("RGB")
          im.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
          buf = io.BytesIO()
          im.save(buf, format="PNG", optimize=True)
        self._cache[path] = _img_tag(buf.getvalue(), image_id)
      except OSError:
        self._cache[path] = None  # not a decodable image: shown by id
    return self._cache[path]


def _config_image_folders(config: Optional[dict]) -> list[str]:
  """String values of config fields named like `image_dir`, `images_dir`, `image_root`."""
  found = []

  def walk(node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value)
      elif isinstance(value, str) and value and "image" in key and key.endswith(("_dir",
                                                                                 "_root")):
        found.append(value)

  walk(config or {})
  return found


def _image_tile(image_id, thumbs: _Thumbnails, label: str, correct=False) -> str:
  """A thumbnail (or the id in a box) with a label under it; correct ones outlined."""
  thumb = thumbs.tag(image_id)
  if thumb is None:
    picture = f'<div class="idbox">{html.escape(str(image_id))}</div>'
  else:
    picture, label = thumb, f"{label} {os.path.basename(str(image_id))}"
  mark = ' <span class="mark">✓</span>' if correct else ""
  return (f'<div class="tile{" ok" if correct else ""}">{picture}{html.escape(label)}{mark}'
          "</div>")


def retrieval_section(examples: dict, thumbs: _Thumbnails) -> str:
  """Text→image and image→text examples with the correct results marked."""
  parts = ["<h3>query sentence → top-5 images</h3>"]
  for q in examples.get("text_to_image", []):
    tiles = "".join(_image_tile(r["image_id"], thumbs, f"#{i + 1}", r.get("correct", False))
                    for i, r in enumerate(q["results"]))
    parts.append(f'<div class="query"><div class="qtext">“{html.escape(q["caption"])}”'
                 f'<div class="muted">caption {q["caption_index"]}</div></div>'
                 f'<div class="tiles">{tiles}</div></div>')
  parts.append("<h3>query image → top-5 sentences</h3>")
  for q in examples.get("image_to_text", []):
    items = "".join(
        f'<li class="{"ok" if r.get("correct") else ""}">{html.escape(r["caption"])}'
        + (' <span class="mark">✓</span>' if r.get("correct") else "") + "</li>"
        for r in q["results"])
    parts.append(f'<div class="query">{_image_tile(q["image_id"], thumbs, "query")}'
                 f'<ol class="caps">{items}</ol></div>')
  return "".join(parts)


def _page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
          f'<meta name="viewport" content="width=device-width, initial-scale=1">'
          f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
          f"<body><main>{body}</main></body></html>\n")


# ----------------------------------------------------------------------------- run report


def _status(workdir, config, results, train) -> tuple[bool, str]:
  num_steps = (config or {}).get("train", {}).get("num_steps")
  if results is not None:
    return True, f"finished at step {results.get('step', '?')}"
  last = train[-1]["step"] if train else None
  of = f" of {num_steps}" if num_steps else ""
  where = f"last logged step {last}{of}" if last is not None else "no training step logged yet"
  return False, (f"Not finished: {os.path.join(os.path.basename(workdir), 'results.json')} "
                 f"is absent (the run is in progress or was interrupted); {where}.")


def _facts(config, results, records) -> str:
  config = config or {}
  pps = [r["perf/pairs_per_sec"] for r in records if "perf/pairs_per_sec" in r]
  nonfinite = max((r["nonfinite_steps"] for r in records if "nonfinite_steps" in r),
                  default=None)
  rows = [
      ("variant", (results or {}).get("variant", config.get("variant"))),
      ("seed", (results or {}).get("seed", config.get("seed"))),
      ("data", config.get("data", {}).get("name")),
      ("similarity head", config.get("model", {}).get("similarity")),
      ("steps", config.get("train", {}).get("num_steps")),
      ("median pairs/s", f"{np.median(pps):.0f}" if pps else None),
      ("non-finite steps skipped", None if nonfinite is None else int(nonfinite)),
  ]
  cells = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>"
                  for k, v in rows if v is not None)
  return f'<table class="facts">{cells}</table>'


def render_run(workdir: str, out: str, image_dirs: Sequence[str] = ()) -> list[str]:
  """Writes the report of one run to `out`; returns the PNG plot files written."""
  config = _read_json(os.path.join(workdir, "config.json"))
  results = _read_json(os.path.join(workdir, "results.json"))
  has_metrics = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  records = read_metrics(workdir) if has_metrics else []
  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  if os.path.exists(os.path.join(workdir, "perf.jsonl")):
    records += read_metrics(workdir, "perf")
  images = _Images(os.path.splitext(out)[0])
  name = os.path.basename(os.path.normpath(workdir))
  finished, status = _status(workdir, config, results, train)

  body = [f"<h1>AEIR run report: {html.escape(name)}</h1>",
          f'<p class="muted">{html.escape(status)}</p>' if finished else _note(status),
          _facts(config, results, records)]

  body.append("<section><h2>Final metrics</h2>")
  if results is not None:
    body.append(metrics_table(results, _splits(results, config)))
  elif evals:
    body.append(_note(f"No final metrics yet; the latest evaluation (step {evals[-1]['step']}) "
                      "is shown instead."))
    body.append(metrics_table(evals[-1], _splits(evals[-1], config)))
  else:
    body.append(_note("No evaluation has been logged yet."))
  body.append("</section>")

  body.append("<section><h2>Training curves</h2>")
  if train:
    body.append(images.plot(loss_figure(train), "losses", "loss terms over training"))
    body.append(images.plot(accuracy_figure(train), "disc_accuracy",
                            "discriminator accuracy per modality"))
  else:
    body.append(_note("metrics.jsonl holds no training steps yet."))
  if evals:
    body.append(images.plot(rsum_figure(evals, _splits(evals[-1], config)), "rsum",
                            "rSum over evaluations"))
  body.append("</section>")

  body.append("<section><h2>Domain alignment</h2>")
  steps = _embedding_steps(workdir)
  if steps:
    chosen = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    loaded = [_load_embeddings(workdir, s) for s in chosen]
    titles = ["start" if chosen[0] == 0 else "first saved", "end" if finished else "latest"]
    if len(chosen) == 1:
      body.append(_note(f"Only one embedding snapshot (step {chosen[0]}) exists so far."))
    for modality in ("image", "caption"):
      keys = [f"{modality}_source", f"{modality}_target"]
      if all(k in emb for emb in loaded for k in keys):
        snaps = [(f"step {s} ({t})", emb) for s, t, emb in zip(chosen, titles, loaded)]
        body.append(images.plot(alignment_figure(modality, snaps), f"alignment_{modality}",
                                f"{modality} embedding alignment"))
      else:
        body.append(_note(f"The embedding files lack {' / '.join(keys)}."))
  else:
    body.append(_note("No embeddings/step_N.npz files yet."))
  body.append("</section>")

  body.append("<section><h2>Retrieval examples (target test)</h2>")
  split = _target_split(workdir)
  if split is None:
    body.append(_note("No retrieval/<split>.json yet: they are written at the final "
                      "evaluation."))
  else:
    examples = _read_json(os.path.join(workdir, "retrieval", f"{split}.json"))
    folders = list(image_dirs) + _config_image_folders(config) + [workdir]
    body.append(f'<p class="muted">split {html.escape(split)}; correct results are marked '
                "✓ and outlined in green.</p>")
    body.append(retrieval_section(examples, _Thumbnails(folders)))
  body.append("</section>")

  _write(out, _page(f"AEIR report: {name}", "".join(body)))
  return images.saved


def _target_split(workdir: str) -> Optional[str]:
  folder = os.path.join(workdir, "retrieval")
  if not os.path.isdir(folder):
    return None
  names = sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(".json"))
  for wanted in (lambda n: n == "target_test", lambda n: n.startswith("target")):
    match = [n for n in names if wanted(n)]
    if match:
      return match[0]
  return None


# ----------------------------------------------------------------------------- sweep report


def _flatten(node: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in node.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.dumps(value)
  return out


def collect_runs(root: str) -> dict:
  """A folder of runs without ROOT/sweep.json, read into the shape of `sweep.collect`:
  `{"metrics", "points": [{dir, group, seed, status, detail, results}], "groups": [{label,
  reference, n, n_planned, mean, std}]}`, a group being the runs whose configs differ only in
  the seed, labelled by the variant and the fields that set it apart."""
  runs = []
  for rel in find_runs(root):
    flat = _flatten(_read_json(os.path.join(root, rel, "config.json")) or {})
    seed = json.loads(flat.pop("seed", "null"))
    runs.append((rel, flat, seed))
  keys = sorted({k for _, flat, _ in runs for k in flat})
  varying = [k for k in keys if len({flat.get(k) for _, flat, _ in runs}) > 1]
  # Fields that follow from the variant (its loss weights) do not need a place in the label.
  own = [k for k in varying if k != "variant" and any(
      len({f.get(k) for _, f, _ in runs if f.get("variant") == v}) > 1
      for v in {f.get("variant") for _, f, _ in runs})]
  points, groups = [], {}
  for rel, flat, seed in runs:
    label = ", ".join([json.loads(flat.get("variant", '"run"'))]
                      + [f"{k}={json.loads(flat[k])}" for k in own if k in flat])
    status = sweep.point_status(os.path.join(root, rel))
    results = _read_json(os.path.join(root, rel, "results.json"))
    points.append({"dir": rel, "group": label, "seed": seed, "status": status, "detail": "",
                   "results": results})
    g = groups.setdefault(label, {"label": label, "reference": "", "n_planned": 0,
                                  "values": []})
    g["n_planned"] += 1
    if results is not None:
      g["values"].append(results)
  metrics = sorted({k for g in groups.values() for r in g["values"] for k, v in r.items()
                    if "/" in k and isinstance(v, (int, float))})
  for g in groups.values():
    values = g.pop("values")
    g["n"], g["mean"], g["std"] = len(values), {}, {}
    for m in metrics:
      column = [r[m] for r in values if m in r]
      if column:
        g["mean"][m] = float(np.mean(column))
        g["std"][m] = float(np.std(column, ddof=1)) if len(column) > 1 else None
  return {"metrics": metrics, "points": points, "groups": list(groups.values())}


def _sweep_splits(metrics: Sequence[str]) -> list[str]:
  splits = {m.split("/", 1)[0] for m in metrics if "/" in m}
  return sorted(splits, key=lambda s: (not s.startswith("target"), s))


def _lower_is_better(column: str) -> bool:
  return column.endswith(("medr", "meanr"))


def sweep_table(data: dict, split: str) -> str:
  """mean ± std per group for one split; the best non-reference mean per column in bold."""
  groups = data["groups"]
  head = "".join(f"<th>{html.escape(label)}</th>" for _, label in METRIC_COLUMNS)
  best = {}
  for c, _ in METRIC_COLUMNS:
    vals = [g["mean"][f"{split}/{c}"] for g in groups
            if f"{split}/{c}" in g["mean"] and not g["reference"]]
    if vals:
      best[c] = min(vals) if _lower_is_better(c) else max(vals)
  rows = []
  for g in groups:
    cells = []
    for c, _ in METRIC_COLUMNS:
      mean, std = g["mean"].get(f"{split}/{c}"), g["std"].get(f"{split}/{c}")
      text = "–" if mean is None else f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}")
      if mean is not None and not g["reference"] and mean == best.get(c):
        text = f"<b>{text}</b>"
      cells.append(f"<td>{text}</td>")
    ref = " <span class=\"muted\">(reference)</span>" if g["reference"] else ""
    rows.append(f"<tr><td>{html.escape(g['label'])}{ref}</td><td>{g['n']}/{g['n_planned']}"
                "</td>" + "".join(cells) + "</tr>")
  return (f"<h3>{html.escape(split)}</h3><table><tr><th>setting</th><th>n</th>{head}</tr>"
          f"{''.join(rows)}</table>")


def sweep_figure(data: dict, splits: Sequence[str]) -> Figure:
  """Mean rSum per group and split, with the std over seeds as error bars."""
  groups = [g for g in data["groups"] if g["n"]]
  fig = Figure(figsize=(11, 1.2 + 0.32 * max(len(groups), 1) * len(splits)),
               layout="constrained")
  ax = fig.subplots()
  height = 0.8 / max(len(splits), 1)
  y = np.arange(len(groups))
  for i, s in enumerate(splits):
    key = f"{s}/rsum"
    ax.barh(y + i * height, [g["mean"].get(key, np.nan) for g in groups], height,
            xerr=[g["std"].get(key) or 0.0 for g in groups], capsize=3, label=s)
  ax.set_yticks(y + height * (len(splits) - 1) / 2,
                [f"{g['label']}{' (reference)' if g['reference'] else ''} (n={g['n']})"
                 for g in groups], fontsize=9)
  ax.invert_yaxis()
  ax.set_xlabel("rSum (mean ± sample std over seeds)")
  ax.set_title("rSum per setting")
  ax.grid(axis="x", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def render_sweep(root: str, out: str) -> list[str]:
  """Writes the comparison page of a sweep to `out`; returns the PNG plot files written."""
  planned = os.path.exists(os.path.join(root, sweep.SWEEP_FILE))
  data = sweep.collect(root) if planned else collect_runs(root)
  images = _Images(os.path.splitext(out)[0])
  name = os.path.basename(os.path.normpath(root))
  points = data["points"]
  done = sum(p["status"] == "finished" for p in points)
  body = [f"<h1>AEIR sweep report: {html.escape(name)}</h1>",
          f'<p class="muted">{len(points)} runs in {len(data["groups"])} settings; {done} '
          f"finished.{'' if planned else ' No sweep.json: settings are grouped by config.'}"
          "</p>"]
  if done < len(points):
    body.append(_note(f"{len(points) - done} run(s) have no results.json yet (in progress, "
                      "failed or not started); means cover finished runs only."))
  splits = [s for s in _sweep_splits(data["metrics"]) if f"{s}/rsum" in data["metrics"]]
  body.append("<section><h2>Comparison</h2>")
  if splits:
    body.append('<p class="muted">mean ± sample std over seeds; n = finished / planned runs; '
                "best mean per column in bold (reference rows excluded).</p>")
    body.append(images.plot(sweep_figure(data, splits), "sweep_rsum", "rSum per setting"))
    body.extend(sweep_table(data, s) for s in splits)
  else:
    body.append(_note("No run has finished yet."))
  body.append("</section>")

  heads = "".join(f"<th>{html.escape(s)} rSum</th>" for s in splits)
  rows = []
  for p in points:
    detail = f": {p['detail']}" if p["detail"] else ""
    cells = "".join(f"<td>{_fmt((p['results'] or {}).get(f'{s}/rsum'))}</td>" for s in splits)
    rows.append(f"<tr><td>{html.escape(p['dir'])}</td><td class=\"l\">"
                f"{html.escape(p['group'])}</td><td>{html.escape(str(p['seed']))}</td>"
                f"<td class=\"l\">{html.escape(p['status'] + detail)}</td>{cells}</tr>")
  body.append(f'<section><h2>Runs</h2><table><tr><th>run</th><th class="l">setting</th>'
              f'<th>seed</th><th class="l">status</th>{heads}</tr>{"".join(rows)}</table>'
              "</section>")
  _write(out, _page(f"AEIR sweep report: {name}", "".join(body)))
  return images.saved


# ----------------------------------------------------------------------------- entry points


def _write(path: str, text: str):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def render(path: str, out: Optional[str] = None, image_dirs: Sequence[str] = ()) -> str:
  """Writes the report of a run or sweep folder `path`; returns the HTML file's path."""
  if not os.path.isdir(path):
    raise WorkdirError(f"{path} is not a folder; pass a run's --workdir or a sweep's root")
  for folder in image_dirs:
    if not os.path.isdir(folder):
      raise UserError(f"--images {folder} is not a folder; pass the folder of image files")
  out = out or os.path.join(path, "report.html")
  if not out.endswith((".html", ".htm")):
    raise UserError(f"--out {out} must end in .html (its plots go in the folder beside it "
                    "named after it)")
  try:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if os.path.exists(os.path.join(path, sweep.SWEEP_FILE)) or (
        not _is_run(path) and find_runs(path)):
      render_sweep(path, out)
    elif _is_run(path):
      render_run(path, out, image_dirs)
    else:
      raise WorkdirError(f"{path} holds no run (config.json, metrics.jsonl, results.json) "
                         "and no runs in its subfolders; pass a run's --workdir or a sweep's "
                         "root")
  except PermissionError as e:
    raise WorkdirError(f"cannot access {e.filename} ({e.strerror}); check its permissions, "
                       "or pass an --out you can write to") from None
  return out


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    print(f"error: {message}; see `python -m aeir_jax.report --help`", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit code (2 for bad input)."""
  parser = _Parser(prog="python -m aeir_jax.report",
                   description="Write a self-contained HTML report of a run or a sweep.")
  parser.add_argument("workdir", help="a run's workdir, or a sweep's root folder")
  parser.add_argument("--out", help="the HTML file (default: WORKDIR/report.html)")
  parser.add_argument("--images", action="append", default=[], metavar="DIR",
                      help="a folder where image ids name image files (repeatable)")
  args = parser.parse_args(argv)
  try:
    out = render(args.workdir, args.out, args.images)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
