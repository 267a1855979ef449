"""Chaos test: kill a training run at random moments, resume it, compare with an uninterrupted run.

    python -m aeir_jax.tools.chaos --config configs/default.py:smoke --root /tmp/chaos \
        --kills 6 --config.train.num_steps=40 --config.train.checkpoint_every=5

Runs `launch.py` once uninterrupted (ROOT/reference), then again in ROOT/chaos, sending SIGKILL
or SIGTERM (chosen at random) at a random moment of each attempt, `--kills` times, and finally
lets it finish. Passes when the final parameters and optimizer states are bit-identical, and
results.json and metrics.jsonl are equal. Exit code 0 on success, 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(config, workdir, overrides, log):
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), "--config", config,
         "--workdir", workdir, "--config.train.progress=False", *overrides]
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _final_state(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  with ocp.StandardCheckpointer() as ckptr:
    return step, ckptr.restore(os.path.join(ckpt_dir, str(step), "state"))


def _leaves_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def run_chaos(config, root, kills, overrides, seed=0, verbose=True):
  """Returns a summary dict; `summary['ok']` tells whether the runs matched."""
  rng = random.Random(seed)
  say = print if verbose else (lambda *a, **k: None)
  ref_dir, chaos_dir = os.path.join(root, "reference"), os.path.join(root, "chaos")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "reference.log"), "w") as log:
    t0 = time.time()
    rc = _launch(config, ref_dir, overrides, log).wait()
    ref_seconds = time.time() - t0
  if rc != 0:
    raise RuntimeError(f"the uninterrupted run failed (exit {rc}); see {root}/reference.log")
  say(f"reference run: {ref_seconds:.1f} s")

  survived = {"SIGKILL": 0, "SIGTERM": 0}
  with open(os.path.join(root, "chaos.log"), "w") as log:
    for attempt in range(kills):
      proc = _launch(config, chaos_dir, overrides, log)
      delay = rng.uniform(0.2, ref_seconds)
      sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
      try:
        proc.wait(timeout=delay)
        say(f"attempt {attempt + 1}: finished before the kill")
        break
      except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        rc = proc.wait()
        survived[sig.name] += 1
        say(f"attempt {attempt + 1}: {sig.name} after {delay:.1f} s (exit {rc})")
    rc = _launch(config, chaos_dir, overrides, log).wait()
  if rc != 0:
    raise RuntimeError(f"the resumed run failed (exit {rc}); see {root}/chaos.log")

  ref_step, ref_state = _final_state(ref_dir)
  chaos_step, chaos_state = _final_state(chaos_dir)
  read = lambda d, f: open(os.path.join(d, f), "rb").read()
  checks = {
      "final_step": ref_step == chaos_step,
      "params": _leaves_equal(ref_state["params"], chaos_state["params"]),
      "optimizer": _leaves_equal(ref_state["opt"], chaos_state["opt"]),
      "results.json": json.loads(read(ref_dir, "results.json"))
                      == json.loads(read(chaos_dir, "results.json")),
      "metrics.jsonl": read(ref_dir, "metrics.jsonl") == read(chaos_dir, "metrics.jsonl"),
  }
  summary = {"ok": all(checks.values()), "checks": checks, "kills": survived,
             "reference_seconds": ref_seconds}
  say(json.dumps(summary, indent=2))
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--root", required=True, help="folder for the two runs and their logs")
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unexpected arguments {bad}; only --config.* overrides are passed through")
  summary = run_chaos(args.config, args.root, args.kills, overrides, args.seed)
  return 0 if summary["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
