"""Sweeps: expansion, skip/resume/failure handling with a fake launcher, emitted scripts,
collection with missing and failed points, and the launch.py --sweep command line.

No test trains: a small script stands in for launch.py (it writes results.json, or fails, or
stops after a "checkpoint" when asked to through the environment).
"""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from aeir_jax import sweep as sweep_lib
from aeir_jax.errors import ConfigError
from configs import default as default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

FAKE_LAUNCH = """
import json, os, sys
argv = sys.argv[1:]
line = " ".join(argv)
wd = argv[argv.index("--workdir") + 1]
arg = argv[argv.index("--config") + 1].partition(":")[2]
os.makedirs(wd, exist_ok=True)
with open(os.path.join(wd, "calls.txt"), "a") as f:
  f.write(line + "\\n")
print("fake training:", line)
fail, stop = os.environ.get("FAKE_FAIL"), os.environ.get("FAKE_STOP")
if fail and fail in line:
  print("Traceback: boom")
  sys.exit(3)
if stop and stop in line and not os.path.isdir(os.path.join(wd, "checkpoints")):
  os.makedirs(os.path.join(wd, "checkpoints"))
  print("Received SIGTERM: saved a checkpoint")
  sys.exit(0)
seed = int(dict(t.split("=") for t in arg.split(",") if "=" in t).get("seed", 0))
resumed = os.path.isdir(os.path.join(wd, "checkpoints"))
with open(os.path.join(wd, "results.json"), "w") as f:
  json.dump({"step": 2, "seed": seed, "resumed": resumed,
             "target_test/rsum": 100.0 + seed, "target_test/i2t_medr": 5.0 - seed}, f)
"""


@pytest.fixture
def launcher(tmp_path):
  path = tmp_path / "fake_launch.py"
  path.write_text(FAKE_LAUNCH)
  return [sys.executable, str(path)]


def _calls(root, point_dir):
  path = os.path.join(root, point_dir, "calls.txt")
  return open(path).read().splitlines() if os.path.exists(path) else []


# ----------------------------------------------------------------------------- declaring


def test_product_zip_named_and_seeds():
  grid = sweep_lib.product(sweep_lib.axis("loss.k", (1, 3)), sweep_lib.axis("loss.tau", (1.0, 3.0)),
                           {"arg": "source_only"})
  assert len(grid) == 4
  assert grid[1] == {"loss.k": 1, "loss.tau": 3.0, "arg": "source_only"}
  zipped = sweep_lib.zip_axes(sweep_lib.axis("loss.k", (1, 3)),
                              sweep_lib.axis("loss.struct_weight", (0.1, 0.3)))
  assert zipped == [{"loss.k": 1, "loss.struct_weight": 0.1},
                    {"loss.k": 3, "loss.struct_weight": 0.3}]
  seeded = sweep_lib.with_seeds([sweep_lib.named("w/o semantic transfer", arg="structural_only")],
                                (0, 1))
  assert seeded == [{"name": "w/o semantic transfer", "arg": "structural_only,seed=0"},
                    {"name": "w/o semantic transfer", "arg": "structural_only,seed=1"}]
  with pytest.raises(ConfigError, match="equal lengths"):
    sweep_lib.zip_axes(sweep_lib.axis("loss.k", (1, 3)), sweep_lib.axis("loss.tau", (1.0,)))
  with pytest.raises(ConfigError, match="both set 'loss.k'"):
    sweep_lib.product(sweep_lib.axis("loss.k", (1,)), sweep_lib.axis("loss.k", (3,)))


def test_default_sweeps():
  points = sweep_lib.expand(default_config.sweep())
  assert len(points) == 15
  by_group = {}
  for p in points:
    by_group.setdefault(p.group, []).append((p.arg, p.seed))
  assert by_group["full AEIR"] == [("aeir,seed=0", 0), ("aeir,seed=1", 1), ("aeir,seed=2", 2)]
  assert by_group["w/o semantic transfer"][0][0] == "structural_only,seed=0"
  assert by_group["w/o structural transfer"][0][0] == "semantic_only,seed=0"
  assert by_group["source only"][0][0] == "source_only,seed=0"
  oracle = [p for p in points if p.arg.startswith("oracle")]
  assert len(oracle) == 3 and all("upper bound" in p.reference for p in oracle)
  assert [p.dir for p in points[9:12]] == ["source_only__seed0", "source_only__seed1",
                                           "source_only__seed2"]
  k = sweep_lib.expand(default_config.sweep("k"))
  assert [p.fields["loss.k"] for p in k[::3]] == [1, 3, 5, 10] and len(k) == 12
  assert k[4].dir == "k3__seed1" and k[4].group == "loss.k=3"
  tau = sweep_lib.expand(default_config.sweep("tau"))
  assert [p.fields["loss.tau"] for p in tau[::3]] == [0.5, 1.0, 3.0, 10.0]
  with pytest.raises(ConfigError, match="unknown sweep 'nope'.*'k', 'tau'"):
    default_config.sweep("nope")


def test_dir_names_unique_and_safe():
  raw = [{"loss.k": 5}, {"model.k": 5}, {"name": "w/o x: y", "arg": "source_only"},
         {"name": "w/o x: y", "arg": "oracle"}, {"model.disc_hidden": (32, 16)},
         {"name": "../../etc/ *weird*"}, {"loss.margin": -0.5, "arg": "seed=3"},
         {"loss.frag_agg": "mean", "loss.k": 5}]
  points = sweep_lib.expand(raw)
  dirs = [p.dir for p in points]
  assert len(set(dirs)) == len(dirs)
  assert all(SAFE_DIR.match(d) for d in dirs), dirs
  assert dirs[:2] == ["loss.k5", "model.k5"]  # short names collide: full field names
  assert dirs[4] == "disc_hidden_32_16" and dirs[5] == "etc_weird"
  assert dirs[6] == "margin-0.5__seed3" and points[6].seed == 3
  labels = [p.group for p in points]
  assert labels[2] != labels[3] and labels[2].startswith("w/o x: y")
  with pytest.raises(ConfigError, match="are the same"):
    sweep_lib.expand([{"loss.k": 5, "arg": "seed=1"}, {"arg": "seed=1", "loss.k": 5}])
  with pytest.raises(ConfigError, match="not a dict"):
    sweep_lib.expand(["aeir"])


def test_commands_join_base_arg_and_overrides(tmp_path):
  points = sweep_lib.expand(default_config.sweep("k"))
  sweep_lib.attach_commands(points, "configs/default.py", "smoke", {"train.num_steps": 2},
                            str(tmp_path), ["python", "launch.py"])
  cmd = points[0].command
  assert cmd[:3] == ["python", "launch.py", "--config"]
  assert cmd[3].endswith("configs/default.py:smoke,seed=0")
  assert cmd[4:] == ["--workdir", str(tmp_path / "k1__seed0"), "--config.loss.k=1",
                     "--config.train.num_steps=2"]
  with pytest.raises(ConfigError, match="swept by point"):
    sweep_lib.attach_commands(points, "configs/default.py", "", {"loss.k": 3}, str(tmp_path),
                              ["python"])


# ----------------------------------------------------------------------------- running


def _plan(root, launcher, raw):
  points = sweep_lib.expand(raw)
  return sweep_lib.attach_commands(points, os.path.join(REPO, "configs/default.py"), "smoke",
                                   {}, root, launcher)


def test_run_skips_finished_resumes_and_records_failures(tmp_path, launcher, monkeypatch,
                                                         capsys):
  root = str(tmp_path / "sweep")
  points = _plan(root, launcher, sweep_lib.with_seeds(
      [{"name": "a", "arg": "aeir"}, {"name": "b", "arg": "source_only"},
       {"name": "c", "arg": "semantic_only"}], (0, 1)))
  sweep_lib.write_sweep_file(root, points, {"config": "configs/default.py", "arg": "smoke",
                                            "sweep": ""})
  os.makedirs(os.path.join(root, "aeir__seed0"))
  with open(os.path.join(root, "aeir__seed0", "results.json"), "w") as f:
    json.dump({"target_test/rsum": 1.0}, f)
  monkeypatch.setenv("FAKE_FAIL", "source_only,seed=1")
  monkeypatch.setenv("FAKE_STOP", "semantic_only")
  assert sweep_lib.run_points(points, root, parallel=2) == 1
  out = capsys.readouterr().out
  assert "skip   aeir__seed0 (finished)" in out and "FAILED source_only__seed1" in out
  assert _calls(root, "aeir__seed0") == []
  failed = open(os.path.join(root, "source_only__seed1", "FAILED")).read()
  assert failed.startswith("exit code 3") and "Traceback: boom" in failed
  assert "no results.json" in open(os.path.join(root, "semantic_only__seed0", "FAILED")).read()
  log = open(os.path.join(root, "source_only__seed1", "log.txt")).read()
  assert "=== sweep" in log and "fake training" in log

  monkeypatch.delenv("FAKE_FAIL")
  assert sweep_lib.run_points(points, root, parallel=1) == 0
  out = capsys.readouterr().out
  assert "start  semantic_only__seed0 (resuming)" in out
  assert re.search(r"done   source_only__seed1 in \d", out)
  for p in points:
    wd = os.path.join(root, p.dir)
    assert os.path.exists(os.path.join(wd, "results.json"))
    assert not os.path.exists(os.path.join(wd, "FAILED"))
  assert len(_calls(root, "semantic_only__seed0")) == 2
  assert json.load(open(os.path.join(root, "semantic_only__seed0", "results.json")))["resumed"]
  assert len(_calls(root, "aeir__seed1")) == 1  # finished in the first pass: skipped
  assert os.path.exists(os.path.join(root, "summary.md"))


# ----------------------------------------------------------------------------- emitting


def test_emitted_scripts_are_valid_shell_and_run(tmp_path, launcher):
  root = str(tmp_path / "sweep")
  points = _plan(root, launcher, sweep_lib.with_seeds([{"arg": "aeir"}, {"arg": "oracle"}],
                                                      (0, 1)))
  scripts = sweep_lib.emit_slurm(points, root, "--gres=gpu:1 -t 4:00:00 --mem=32G",
                                 job_prefix="default")
  shell = sweep_lib.emit_shell(points, root)
  for path in scripts + [shell]:
    subprocess.run(["bash", "-n", path], check=True)
  job = open(scripts[0]).read()
  for line in ("#SBATCH --job-name=default-aeir__seed0",
               f"#SBATCH --output={root}/aeir__seed0/log.txt", "#SBATCH --gres=gpu:1",
               "#SBATCH -t 4:00:00", "#SBATCH --mem=32G"):
    assert line in job.splitlines()
  assert len(open(scripts[-1]).read().splitlines()) == 2 + len(points)
  commands = [l for l in open(shell).read().splitlines() if not l.startswith("#")]
  assert len(commands) == len(points)

  # The sbatch script runs under plain bash; commands.sh runs through xargs, skipping it.
  subprocess.run(["bash", scripts[0]], check=True, capture_output=True)
  env = dict(os.environ, FAKE_FAIL="oracle,seed=1")
  result = subprocess.run(f"xargs -d '\\n' -P 2 -I{{}} bash -c {{}} < {shell}", shell=True,
                          env=env, capture_output=True)
  assert result.returncode != 0
  assert len(_calls(root, "aeir__seed0")) == 1
  for d in ("aeir__seed0", "aeir__seed1", "oracle__seed0"):
    assert os.path.exists(os.path.join(root, d, "results.json"))
  assert open(os.path.join(root, "oracle__seed1", "FAILED")).read().startswith("exit code 3")


# ----------------------------------------------------------------------------- collecting


def _fabricate(root):
  """A sweep of 4 groups x 3 seeds: a done, b with one failure, oracle done, c unfinished."""
  raw = sweep_lib.with_seeds([sweep_lib.named("a", arg="aeir"),
                              sweep_lib.named("b", arg="source_only"),
                              sweep_lib.named("oracle", arg="oracle", reference="upper bound"),
                              sweep_lib.named("c", arg="semantic_only")], (0, 1, 2))
  points = sweep_lib.attach_commands(sweep_lib.expand(raw), "configs/default.py", "", {}, root,
                                     ["python", "launch.py"])
  sweep_lib.write_sweep_file(root, points, {"config": "configs/default.py", "arg": "",
                                            "sweep": ""})
  values = {"aeir": (300.0, 310.0, 320.0), "source_only": (200.0, 220.0, None),
            "oracle": (400.0, 400.0, 400.0)}
  for p in points:
    wd = os.path.join(root, p.dir)
    variant = p.arg.split(",")[0]
    os.makedirs(wd, exist_ok=True)
    if variant in values and values[variant][p.seed] is not None:
      rsum = values[variant][p.seed]
      with open(os.path.join(wd, "results.json"), "w") as f:
        json.dump({"step": 10, "seed": p.seed, "variant": variant, "target_test/rsum": rsum,
                   "target_test/i2t_medr": rsum / 100, "target_test/i2t_r1": rsum / 10},
                  f)
    elif variant == "source_only":
      with open(os.path.join(wd, "FAILED"), "w") as f:
        f.write("exit code 1\n--- last lines ---\nboom\n")
  os.makedirs(os.path.join(root, "semantic_only__seed0", "checkpoints", "3"))
  return points


def test_collect_with_missing_and_failed_points(tmp_path):
  root = str(tmp_path)
  _fabricate(root)
  data = sweep_lib.collect(root)
  groups = {g["label"]: g for g in data["groups"]}
  assert list(groups) == ["a", "b", "oracle", "c"]
  assert groups["a"]["n"] == 3 and groups["a"]["mean"]["target_test/rsum"] == 310.0
  assert groups["a"]["std"]["target_test/rsum"] == pytest.approx(10.0)  # sample std
  assert groups["b"]["n"] == 2 and groups["b"]["seeds"] == [0, 1]
  assert groups["c"]["n"] == 0 and groups["c"]["n_planned"] == 3 and groups["c"]["mean"] == {}
  status = {p["dir"]: (p["status"], p["detail"]) for p in data["points"]}
  assert status["source_only__seed2"] == ("failed", "exit code 1")
  assert status["semantic_only__seed0"][0] == "resumable"
  assert status["semantic_only__seed1"][0] == "new"

  sweep_lib.write_summary(root, ["target_test/rsum", "target_test/i2t_medr"])
  md = open(os.path.join(root, "summary.md")).read()
  row = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
  assert "**310.00 ± 10.00**" in row["a"] and "3/3" in row["a"]
  assert "2/3" in row["b"] and "**2.10 ± 0.14**" in row["b"]  # lower medr is better
  assert "**" not in row["oracle [1]"]  # reference rows are never "best"
  assert "| c | 0/3 | - | - |" in md
  assert "[1] reference row: upper bound" in md
  assert "`source_only__seed2` (b) failed: exit code 1" in md
  assert "`semantic_only__seed0` (c) resumable" in md and "`semantic_only__seed2` (c) new" in md
  rows = list(csv.DictReader(open(os.path.join(root, "summary.csv"))))
  assert [r["setting"] for r in rows] == ["a", "b", "oracle", "c"]
  assert float(rows[1]["target_test/rsum_mean"]) == 210.0 and rows[3]["n"] == "0"
  assert rows[2]["target_test/rsum_std"] == "0.0" and rows[3]["target_test/rsum_mean"] == ""
  assert open(os.path.join(root, "summary.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_collect_command_line(tmp_path, capsys):
  root = str(tmp_path)
  _fabricate(root)
  assert sweep_lib.main(["collect", root, "--metric", "target_test/rsum"]) == 0
  assert "8/12 points finished" in capsys.readouterr().out
  assert sweep_lib.main(["collect", root, "--metric", "target_test/bogus"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "target_test/bogus" in err
  assert sweep_lib.main(["collect", str(tmp_path / "nothing")]) == 2
  assert "sweep.json does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- launch.py


def _launch(*args, env=None):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=120)


def test_cli_dry_run_and_bad_sweep_name(tmp_path):
  root = tmp_path / "sweep"
  result = _launch("--config", "configs/default.py:smoke", "--sweep", "--dry-run",
                   "--workdir", str(root), "--config.train.num_steps=2")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("15 points in")
  assert "configs/default.py:smoke,oracle,seed=2 --workdir" in result.stdout
  assert "--config.train.num_steps=2" in result.stdout
  assert not root.exists()
  result = _launch("--config", "configs/default.py", "--sweep", "nope", "--workdir", str(root))
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "unknown sweep 'nope'" in result.stderr
  result = _launch("--config", "configs/default.py", "--parallel", "2", "--workdir", str(root))
  assert result.returncode == 2 and "add --sweep" in result.stderr


def test_cli_runs_sweep_with_launcher(tmp_path, launcher):
  root = tmp_path / "sweep"
  args = ("--config", "configs/default.py:smoke", "--sweep", "k", "--workdir", str(root),
          "--launcher", " ".join(launcher), "--config.train.num_steps=2")
  result = _launch(*args, "--parallel", "3", env=dict(os.environ, FAKE_FAIL="loss.k=10"))
  assert result.returncode == 1, result.stderr
  assert "3 failed" in result.stdout and "k10__seed0" in result.stdout
  assert _calls(root, "k5__seed1") == [
      f"--config {REPO}/configs/default.py:smoke,seed=1 --workdir {root}/k5__seed1 "
      "--config.loss.k=5 --config.train.num_steps=2"]
  doc = json.load(open(root / "sweep.json"))
  assert doc["sweep"] == "k" and len(doc["points"]) == 12
  assert "| loss.k=10 | 0/3 |" in open(root / "summary.md").read()
  result = _launch(*args)
  assert result.returncode == 0, result.stdout
  assert result.stdout.count("skip") == 9 and result.stdout.count("done") == 3
  assert len(_calls(root, "k1__seed0")) == 1

  result = _launch(*args[:-3], "--emit", "slurm", "--slurm-args", "--gres=gpu:1")
  assert result.returncode == 0, result.stderr
  assert (root / "submit_all.sh").exists() and (root / "k1__seed0" / "job.sbatch").exists()
