"""Atomic writes of the small files a run leaves in its workdir (results, plots' inputs).

Every file is written to a temporary name and renamed, so a killed run never leaves a
half-written results.json or embeddings file behind.

Workdir layout:
  config.json             the full config of the run
  metrics.jsonl           one JSON line per log/eval step ("kind": "train" | "eval")
  tb/                     TensorBoard event files
  checkpoints/<step>/     Orbax checkpoints (state + meta)
  embeddings/step_N.npz   pooled test embeddings per domain and modality at each evaluation
  retrieval/<split>.json  top-5 retrieval examples of the final evaluation
  results.json            the final metrics (written last: its presence means "finished")
"""

from __future__ import annotations

import io
import json
import os

import numpy as np


def _atomic_write(path: str, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(workdir: str, relpath: str, obj):
  _atomic_write(os.path.join(workdir, relpath),
                json.dumps(obj, indent=2, sort_keys=True).encode())


def write_npz(workdir: str, relpath: str, arrays: dict):
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  _atomic_write(os.path.join(workdir, relpath), buf.getvalue())
