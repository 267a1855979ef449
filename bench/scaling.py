"""Sweeps the train step over mesh sizes, each in its own process (`bench/train_step.py`).

    python bench/scaling.py                                  # 1, 2, 4, 8 fake CPU devices
    python bench/scaling.py --devices=1,2,4,8 -- --config.data.source_batch=256 \
        --config.data.target_batch=256

Arguments after `--` go to every `train_step.py` run (default: `--config configs/default.py`).
The global batch stays fixed, so this is strong scaling: on real devices the ideal step time
is the first row's divided by the device ratio (efficiency 1). On a CPU host the devices are
fake (threads of one process on the same cores), so the ideal is an unchanged step time
("time x" 1) and the row shows what partitioning and collectives cost. Prints one row per mesh
size and writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run(num_devices, step_args, steps):
  """One `train_step.py` process on `num_devices` devices; returns its JSON results."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"), f"--num_devices={num_devices}",
           f"--steps={steps}", f"--json={out}", *step_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(HERE))
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", default="1,2,4,8", help="comma-separated mesh sizes")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
  parser.add_argument("--json", default="", help="write the results to this JSON file")
  args, step_args = parser.parse_known_args()
  step_args = [a for a in step_args if a != "--"] or ["--config", "configs/default.py"]
  rows = []
  print(f"{'devices':>7} {'step ms':>9} {'pairs/s':>9} {'GFLOP/s/dev':>11} {'of peak':>8} "
        f"{'time x':>7} {'efficiency':>10}")
  for n in map(int, args.devices.split(",")):
    result = run(n, step_args, args.steps)
    first = rows[0] if rows else result
    ratio = result["step_seconds_median"] / first["step_seconds_median"]
    result["step_time_vs_first"] = ratio
    result["strong_scaling_efficiency"] = first["num_devices"] / (n * ratio)
    rows.append(result)
    print(f"{n:>7} {1e3 * result['step_seconds_median']:>9.1f} "
          f"{result['pairs_per_second']:>9.0f} "
          f"{result['achieved_flops_per_second_per_device'] / 1e9:>11.1f} "
          f"{result['fraction_of_matmul_peak']:>8.3f} {ratio:>7.2f} "
          f"{result['strong_scaling_efficiency']:>10.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
