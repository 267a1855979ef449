"""Metric logging: JSON lines and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import os


class MetricsWriter:
  """Appends `{"step", "kind", ...metrics}` lines to `<workdir>/metrics.jsonl` and writes the
  same scalars to TensorBoard under `<workdir>/tb`. Only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self._path, "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: dict, kind: str):
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self):
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """Reads `<workdir>/metrics.jsonl`, keeping the last record per (step, kind).

  A resumed run re-logs the steps after its last checkpoint; the later lines win.
  """
  path = os.path.join(workdir, "metrics.jsonl")
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
