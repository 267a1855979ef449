"""Metric logging: JSON lines and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import os


class MetricsWriter:
  """Writes `{"step", "kind", ...values}` JSON lines and TensorBoard scalars (`<workdir>/tb`).

  Kinds "train", "eval" and "event" go to `metrics.jsonl`, which is a deterministic function of
  the config and seed; "perf" (throughput, wall-clock) goes to `perf.jsonl`. With
  `truncate_after=s` (a run resumed from step s) both files first drop their records after
  step s, so a resumed run's files equal an uninterrupted run's. Only process 0 writes.
  """

  FILES = {"train": "metrics.jsonl", "eval": "metrics.jsonl", "event": "metrics.jsonl",
           "perf": "perf.jsonl"}

  def __init__(self, workdir: str, enabled: bool = True, truncate_after: int | None = None):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._files = {}
    for name in sorted(set(self.FILES.values())):
      path = os.path.join(workdir, name)
      if truncate_after is not None and os.path.exists(path):
        _truncate(path, truncate_after)
      self._files[name] = open(path, "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: dict, kind: str):
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: float(v) for k, v in metrics.items()}}
    f = self._files[self.FILES[kind]]
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k if "/" in k else f"{kind}/{k}", float(v), int(step))

  def close(self):
    if not self.enabled:
      return
    for f in self._files.values():
      f.close()
    if self._tb is not None:
      self._tb.close()


def _truncate(path: str, last_step: int):
  """Keeps the complete records with step <= last_step (atomically rewritten)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if rec.get("step", 0) <= last_step:
        kept.append(json.dumps(rec, sort_keys=True) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """Reads `<workdir>/metrics.jsonl` (and perf.jsonl for kind="perf"), last record per
  (step, kind) winning."""
  path = os.path.join(workdir, MetricsWriter.FILES.get(kind or "train"))
  records = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if kind is None or rec.get("kind") == kind:
        records[(rec["step"], rec["kind"])] = rec
  return [records[k] for k in sorted(records)]


def format_results_table(results: dict, splits: list[str]) -> str:
  """A Markdown table of R@1/5/10 (both directions), rSum and medians per evaluated split."""
  cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
          "i2t_medr", "t2i_medr"]
  lines = ["| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for split in splits:
    vals = [results.get(f"{split}/{c}") for c in cols]
    lines.append(f"| {split} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
                 + " |")
  return "\n".join(lines)
