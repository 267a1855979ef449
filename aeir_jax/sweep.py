"""Ablation sweeps: declare points beside a config, run or emit them, collect one table.

Declaring. A config file may define `sweep(name="")` beside `get_config`; it returns a list
of points, each a dict with
  "name"       optional row label, e.g. "w/o semantic transfer"
  "arg"        optional config arg, e.g. "source_only,seed=1" (joined after the --config arg)
  "reference"  optional note that marks a reference row (e.g. an upper bound); such rows are
               kept out of the best-per-column marks
  "a.b": v     dotted field overrides, e.g. "loss.k": 5
The helpers below build them:

  from aeir_jax import sweep as sweep_lib

  def sweep(name=""):
    return sweep_lib.choose(name, {
        "": lambda: sweep_lib.transfer_ablation(seeds=(0, 1, 2)),
        "k": lambda: sweep_lib.with_seeds(sweep_lib.axis("loss.k", (1, 3, 5, 10))),
        "k_tau": lambda: sweep_lib.product(sweep_lib.axis("loss.k", (3, 5)),
                                           sweep_lib.axis("loss.tau", (1.0, 3.0))),
    })

Running (flags of launch.py; see aeir_jax/cli.py):

  python launch.py --config configs/default.py[:arg] --sweep [NAME] --workdir ROOT \
      [--parallel N] [--dry-run] [--emit slurm|shell] [--slurm-args "..."] [--config.a.b=v]

Every point runs as a plain launch.py command line in ROOT/<point dir>; its output goes to
ROOT/<point dir>/log.txt. Points with results.json are skipped, interrupted ones resume from
their checkpoint, and a failed one leaves ROOT/<point dir>/FAILED (exit code and the end of
its log). ROOT/sweep.json lists the points.

Collecting:

  python -m aeir_jax.sweep collect ROOT [--metric target_test/rsum ...]

writes ROOT/summary.csv, summary.md and summary.png: mean and sample std over seeds per group
(a group is a point without its seed); `collect(root)` returns the same data as a dict.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from aeir_jax.errors import ConfigError, UserError

RESERVED = ("name", "arg", "reference")
SWEEP_FILE = "sweep.json"
FAILED_FILE = "FAILED"
LOG_FILE = "log.txt"
LOG_TAIL_LINES = 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_METRICS = tuple(f"target_test/{m}" for m in (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"))

# ----------------------------------------------------------------------------- declaring


def axis(field: str, values) -> list[dict]:
  """One point per value of a dotted field (or of "arg"): axis("loss.k", (1, 3))."""
  return [{field: v} for v in values]


def named(name: str, arg: str = "", fields: dict | None = None, reference: str = "") -> dict:
  """A named point: named("w/o semantic transfer", arg="structural_only")."""
  point = {"name": name, **(fields or {})}
  if arg:
    point["arg"] = arg
  if reference:
    point["reference"] = reference
  return point


def merge(*points: dict) -> dict:
  """Combines partial points: names, args and notes are joined; a field set twice is an error."""
  out = {}
  for point in points:
    for key, value in point.items():
      if key in RESERVED:
        sep = {"name": ", ", "arg": ",", "reference": "; "}[key]
        out[key] = sep.join(filter(None, (out.get(key, ""), value)))
      elif key in out:
        raise ConfigError(f"sweep axes both set {key!r} ({out[key]!r} and {value!r}); "
                          "combine each field in one axis only")
      else:
        out[key] = value
  return out


def product(*axes) -> list[dict]:
  """Every combination of the axes' points (a dict counts as a one-point axis)."""
  points = [{}]
  for ax in axes:
    ax = [ax] if isinstance(ax, dict) else list(ax)
    points = [merge(p, q) for p in points for q in ax]
  return points


def zip_axes(*axes) -> list[dict]:
  """The i-th points of equally long axes merged: zip_axes(axis("a", ..), axis("b", ..))."""
  axes = [list(ax) for ax in axes]
  if len({len(ax) for ax in axes}) > 1:
    raise ConfigError(f"zip_axes got axes of lengths {[len(ax) for ax in axes]}; give them "
                      "equal lengths (or use product)")
  return [merge(*items) for items in zip(*axes)]


def with_seeds(points, seeds=(0, 1, 2)) -> list[dict]:
  """Each point once per training seed, set through the config arg ("seed=N")."""
  return product(points, [{"arg": f"seed={s}"} for s in seeds])


TRANSFER_ABLATION = (("full AEIR", "aeir"),
                     ("w/o semantic transfer", "structural_only"),
                     ("w/o structural transfer", "semantic_only"),
                     ("source only", "source_only"))
ORACLE_NOTE = "upper bound: trained on target pairs, not a transfer method"


def transfer_ablation(seeds=(0, 1, 2)) -> list[dict]:
  """Full AEIR and its transfer ablations x seeds, plus the target-paired oracle as reference."""
  points = [named(name, arg=variant) for name, variant in TRANSFER_ABLATION]
  points.append(named("oracle (target pairs)", arg="oracle", reference=ORACLE_NOTE))
  return with_seeds(points, seeds)


def choose(name: str, sweeps: dict) -> list[dict]:
  """sweeps[name]() for a config's sweep(name); an unknown name is a ConfigError."""
  if name not in sweeps:
    known = ", ".join("'' (the default: --sweep alone)" if k == "" else repr(k) for k in sweeps)
    raise ConfigError(f"unknown sweep {name!r}; known: {known}; pass one of them to --sweep")
  return sweeps[name]()


# ----------------------------------------------------------------------------- points


@dataclasses.dataclass
class Point:
  """One expanded sweep point; `args` are its launch.py arguments, `command` the full line."""
  dir: str
  name: str
  arg: str
  fields: dict
  seed: int | None
  reference: str
  group: str
  args: list = dataclasses.field(default_factory=list)
  command: list = dataclasses.field(default_factory=list)


def _arg_tokens(arg: str) -> list[str]:
  return [t.strip() for t in (arg or "").split(",") if t.strip()]


def _is_seed_token(token: str) -> bool:
  return token.startswith("seed=")


def format_value(value) -> str:
  """A field value as the --config.a.b=VALUE text that ml_collections parses back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._-")


def _dir_name(point: dict, long_keys: bool) -> str:
  tokens = [t.replace("=", "") for t in point["tokens"] if not _is_seed_token(t)]
  for key, value in point["fields"].items():
    if key != "seed":
      tokens.append((key if long_keys else key.rsplit(".", 1)[-1]) + format_value(value))
  tokens = [_safe(t) for t in tokens if _safe(t)]
  if not tokens and point["name"]:
    tokens = [_safe(point["name"])]
  if point["seed"] is not None:
    tokens.append(f"seed{point['seed']}")
  name = "__".join(tokens) or "default"
  if len(name) > 100:
    name = f"{name[:80]}__{point['hash']}"
  return name


def _describe(tokens, fields) -> str:
  parts = [t for t in tokens if not _is_seed_token(t)]
  parts += [f"{k}={format_value(v)}" for k, v in fields.items() if k != "seed"]
  return ", ".join(parts) or "default"


def _normalize(raw, index) -> dict:
  where = f"sweep point {index} ({raw!r})"
  if not isinstance(raw, dict):
    raise ConfigError(f"{where} is not a dict; sweep() must return dicts such as "
                      "{'arg': 'source_only,seed=1', 'loss.k': 5}")
  fields = {}
  for key, value in raw.items():
    if key in RESERVED:
      if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string")
      continue
    scalars = value if isinstance(value, (tuple, list)) else (value,)
    if not isinstance(key, str) or not all(isinstance(v, (bool, int, float, str))
                                           for v in scalars):
      raise ConfigError(f"{where}: field {key!r} must be a dotted config field with a number, "
                        "string, bool or tuple value")
    fields[key] = tuple(value) if isinstance(value, list) else value
  tokens = _arg_tokens(raw.get("arg", ""))
  keys = [t.split("=", 1)[0] for t in tokens if "=" in t]
  if len(keys) != len(set(keys)):
    raise ConfigError(f"{where}: its arg {raw.get('arg')!r} sets a key twice; set each once")
  seed = None
  for token in tokens:
    if _is_seed_token(token):
      try:
        seed = int(token.split("=", 1)[1])
      except ValueError:
        raise ConfigError(f"{where}: {token!r} is not an integer seed") from None
  if "seed" in fields:
    if seed is not None or not isinstance(fields["seed"], int):
      raise ConfigError(f"{where}: set the seed once, as an integer (in its arg or as a field)")
    seed = fields["seed"]
  name, reference = raw.get("name", ""), raw.get("reference", "")
  canonical = json.dumps([name, sorted(tokens), sorted((k, repr(v)) for k, v in fields.items())])
  group_key = json.dumps([name, sorted(t for t in tokens if not _is_seed_token(t)),
                          sorted((k, repr(v)) for k, v in fields.items() if k != "seed"),
                          reference])
  return {"name": name, "arg": ",".join(tokens), "tokens": tokens, "fields": fields,
          "seed": seed, "reference": reference, "canonical": canonical, "group_key": group_key,
          "hash": hashlib.sha1(canonical.encode()).hexdigest()[:8],
          "description": _describe(tokens, fields)}


def expand(raw_points) -> list[Point]:
  """Checks a sweep's points and gives each a unique, filesystem-safe dir and a group label."""
  raw_points = list(raw_points)
  if not raw_points:
    raise ConfigError("the sweep has no points; sweep() must return a non-empty list")
  points = [_normalize(p, i) for i, p in enumerate(raw_points)]
  seen = {}
  for i, p in enumerate(points):
    if p["canonical"] in seen:
      raise ConfigError(f"sweep points {seen[p['canonical']]} and {i} are the same "
                        f"({p['description']}, seed {p['seed']}); remove one")
    seen[p["canonical"]] = i
  dirs = _unique([_dir_name(p, False) for p in points],
                 lambda i: _dir_name(points[i], True))
  dirs = _unique(dirs, lambda i: f"{dirs[i]}__{points[i]['hash']}")
  labels = {}
  for p in points:
    labels.setdefault(p["group_key"], p["name"] or p["description"])
  counts = {}
  for label in labels.values():
    counts[label] = counts.get(label, 0) + 1
  for key, label in labels.items():
    if counts[label] > 1:
      p = next(q for q in points if q["group_key"] == key)
      labels[key] = f"{label} ({p['description']})"
  return [Point(dir=d, name=p["name"], arg=p["arg"], fields=p["fields"], seed=p["seed"],
                reference=p["reference"], group=labels[p["group_key"]])
          for d, p in zip(dirs, points)]


def _unique(names, rename):
  """Renames (by index) every name that occurs more than once."""
  counts = {}
  for n in names:
    counts[n] = counts.get(n, 0) + 1
  return [rename(i) if counts[n] > 1 else n for i, n in enumerate(names)]


def load_points(config_path: str, name: str) -> list[Point]:
  """Calls `sweep(name)` of a config file and expands its points."""
  spec = importlib.util.spec_from_file_location("_aeir_sweep_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep_fn = getattr(module, "sweep", None)
  if sweep_fn is None:
    raise ConfigError(f"{config_path} defines no sweep(); add sweep(name='') returning points "
                      "(see aeir_jax/sweep.py) or pick a config that has one")
  try:
    return expand(sweep_fn(name) if name else sweep_fn())
  except ConfigError as e:
    raise ConfigError(f"{config_path}: {e}") from None


def attach_commands(points, config_path, base_arg, extra, root, launcher) -> list[Point]:
  """Fills each point's launch.py arguments and command line.

  `base_arg` (the --config file's arg) is joined before each point's arg; `extra` holds the
  --config.* overrides of the sweep command line, applied to every point.
  """
  base_keys = {t.split("=", 1)[0] for t in _arg_tokens(base_arg) if "=" in t}
  config_path = os.path.abspath(config_path)
  for p in points:
    point_keys = {t.split("=", 1)[0] for t in _arg_tokens(p.arg) if "=" in t}
    if base_keys & point_keys:
      raise ConfigError(f"the --config arg {base_arg!r} sets {sorted(base_keys & point_keys)}, "
                        f"which sweep point {p.dir} sets too; drop it from the --config arg")
    clash = sorted(set(extra) & set(p.fields))
    if clash:
      raise ConfigError(f"--config.{clash[0]} is swept by point {p.dir}; drop it from the "
                        "command line or pick another sweep")
    arg = ",".join(filter(None, (base_arg, p.arg)))
    overrides = {**p.fields, **extra}
    p.args = ["--config", f"{config_path}:{arg}" if arg else config_path,
              "--workdir", os.path.join(root, p.dir),
              *(f"--config.{k}={format_value(v)}" for k, v in overrides.items())]
    p.command = [*launcher, *p.args]
  return points


def default_launcher() -> list[str]:
  return [sys.executable, os.path.join(REPO_ROOT, "launch.py")]


def point_status(workdir: str) -> str:
  """finished | failed | resumable (has a checkpoint) | new."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return "finished"
  if os.path.exists(os.path.join(workdir, FAILED_FILE)):
    return "failed"
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    return "resumable"
  return "new"


def write_sweep_file(root, points, meta: dict):
  os.makedirs(root, exist_ok=True)
  doc = {**meta, "points": [{**dataclasses.asdict(p), "command": shlex.join(p.command)}
                            for p in points]}
  tmp = os.path.join(root, f".{SWEEP_FILE}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, os.path.join(root, SWEEP_FILE))


def print_plan(points, root, out=None):
  """--dry-run: every point, its status and its command line."""
  out = out or sys.stdout
  print(f"{len(points)} points in {root}:", file=out)
  for p in points:
    status = point_status(os.path.join(root, p.dir))
    print(f"  {p.dir}  [{p.group}{', seed ' + str(p.seed) if p.seed is not None else ''}] "
          f"({status})\n    {shlex.join(p.command)}", file=out)


# ----------------------------------------------------------------------------- emitting


def _slurm_lines(slurm_args: str) -> list[str]:
  """'--gres=gpu:1 -t 4:00:00' -> ['#SBATCH --gres=gpu:1', '#SBATCH -t 4:00:00']."""
  lines = []
  for token in shlex.split(slurm_args or ""):
    if token.startswith("-") or not lines:
      lines.append(f"#SBATCH {token}")
    else:
      lines[-1] += f" {token}"
  return lines


def emit_slurm(points, root, slurm_args="", job_prefix="aeir") -> list[str]:
  """One sbatch script per point (ROOT/<point>/job.sbatch) and ROOT/submit_all.sh."""
  paths = []
  for p in points:
    wd = os.path.join(root, p.dir)
    os.makedirs(wd, exist_ok=True)
    q = shlex.quote(wd)
    body = [
        "#!/bin/bash",
        f"#SBATCH --job-name={_safe(job_prefix)}-{p.dir}",
        f"#SBATCH --output={os.path.join(wd, LOG_FILE)}",
        "#SBATCH --open-mode=append",
        *_slurm_lines(slurm_args),
        f"# Sweep point {p.dir} ({p.group}); running it again resumes from its checkpoint.",
        f"if [ -f {q}/results.json ]; then echo 'finished already'; exit 0; fi",
        f"rm -f {q}/{FAILED_FILE}",
        shlex.join(p.command),
        "rc=$?",
        'if [ "$rc" -ne 0 ]; then',
        f'  {{ echo "exit code $rc"; tail -n {LOG_TAIL_LINES} {q}/{LOG_FILE}; }} > '
        f"{q}/{FAILED_FILE}",
        "fi",
        'exit "$rc"',
    ]
    path = os.path.join(wd, "job.sbatch")
    _write_script(path, body)
    paths.append(path)
  submit = ["#!/bin/bash",
            "# Submits every point of the sweep that has no results.json yet.",
            *(f"[ -f {shlex.quote(os.path.join(root, p.dir))}/results.json ] || sbatch "
              f"{shlex.quote(path)}" for p, path in zip(points, paths))]
  _write_script(os.path.join(root, "submit_all.sh"), submit)
  return paths + [os.path.join(root, "submit_all.sh")]


def emit_shell(points, root) -> str:
  """ROOT/commands.sh: one self-contained command line per point (finished ones skip)."""
  lines = ["# One sweep point per line; run N at a time with",
           f"#   xargs -d '\\n' -P N -I{{}} bash -c {{}} < {shlex.quote(root)}/commands.sh"]
  for p in points:
    wd = os.path.join(root, p.dir)
    os.makedirs(wd, exist_ok=True)
    q = shlex.quote(wd)
    lines.append(
        f"test -f {q}/results.json || {{ rm -f {q}/{FAILED_FILE}; {shlex.join(p.command)} "
        f">> {q}/{LOG_FILE} 2>&1 || {{ rc=$?; {{ echo \"exit code $rc\"; tail -n "
        f"{LOG_TAIL_LINES} {q}/{LOG_FILE}; }} > {q}/{FAILED_FILE}; exit $rc; }}; }}")
  path = os.path.join(root, "commands.sh")
  _write_script(path, lines)
  return path


def _write_script(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.chmod(path, 0o755)


# ----------------------------------------------------------------------------- running


def _elapsed(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(seconds), 60)
  if minutes < 60:
    return f"{minutes}m{secs:02d}s"
  return f"{minutes // 60}h{minutes % 60:02d}m"


def _log_tail(path, n=LOG_TAIL_LINES) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


class _Signals:
  """SIGINT/SIGTERM during a sweep: forward to the running points (they checkpoint and stop)
  and start no more; a second signal kills them."""

  def __init__(self, running):
    self.running = running
    self.signal = None
    self._previous = {}

  def __enter__(self):
    try:
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # not the main thread: signals stay with the caller
      pass
    return self

  def _handle(self, signum, frame):
    del frame
    again = self.signal is not None
    self.signal = signal.Signals(signum).name
    for proc in list(self.running):
      if again:
        proc.kill()
      else:
        proc.send_signal(signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_points(points, root, parallel=1, out=None) -> int:
  """Runs the unfinished points, `parallel` at a time; returns 0, 1 (failures) or 130.

  Each point's command is a subprocess with output appended to ROOT/<point>/log.txt.
  """
  out = out or sys.stdout
  say = lambda msg: print(f"[sweep] {msg}", file=out, flush=True)
  total, width = len(points), len(str(len(points)))
  env = dict(os.environ)
  if parallel > 1:  # several JAX processes may share one accelerator
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  todo, skipped, done, failed, stopped = [], [], [], [], []
  for i, p in enumerate(points, 1):
    if point_status(os.path.join(root, p.dir)) == "finished":
      say(f"{i:>{width}}/{total} skip   {p.dir} (finished)")
      skipped.append(p)
    else:
      todo.append((i, p))
  running = {}
  with _Signals(running) as signals:
    while (todo and signals.signal is None) or running:
      while todo and len(running) < parallel and signals.signal is None:
        i, p = todo.pop(0)
        wd = os.path.join(root, p.dir)
        resume = os.path.isdir(os.path.join(wd, "checkpoints"))
        os.makedirs(wd, exist_ok=True)
        if os.path.exists(os.path.join(wd, FAILED_FILE)):
          os.remove(os.path.join(wd, FAILED_FILE))
        with open(os.path.join(wd, LOG_FILE), "a") as log:
          log.write(f"\n=== sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{shlex.join(p.command)}\n")
          log.flush()
          proc = subprocess.Popen(p.command, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)
        running[proc] = (i, p, time.time())
        say(f"{i:>{width}}/{total} start  {p.dir}{' (resuming)' if resume else ''}")
      time.sleep(0.05)
      for proc in [q for q in running if q.poll() is not None]:
        i, p, start = running.pop(proc)
        wd = os.path.join(root, p.dir)
        took = _elapsed(time.time() - start)
        if proc.returncode == 0 and point_status(wd) == "finished":
          say(f"{i:>{width}}/{total} done   {p.dir} in {took}")
          done.append(p)
        elif signals.signal is not None:
          say(f"{i:>{width}}/{total} stopped {p.dir} after {took} (resumable)")
          stopped.append(p)
        else:
          reason = (f"exit code {proc.returncode}" if proc.returncode else
                    "exit code 0 but no results.json (the run was interrupted)")
          with open(os.path.join(wd, FAILED_FILE), "w") as f:
            f.write(f"{reason}\n--- last lines of {LOG_FILE} ---\n"
                    f"{_log_tail(os.path.join(wd, LOG_FILE))}")
          say(f"{i:>{width}}/{total} FAILED {p.dir} ({reason}) after {took}; see "
              f"{os.path.join(wd, LOG_FILE)}")
          failed.append(p)
  summary = (f"{len(done)} ran, {len(skipped)} finished before, {len(failed)} failed"
             + (f", {len(stopped) + len(todo)} not finished" if signals.signal else ""))
  if signals.signal:
    say(f"stopped by {signals.signal}: {summary}; run the same command again to resume")
    return 130
  if done or skipped:
    write_summary(root)
    say(f"summary in {os.path.join(root, 'summary.md')}")
  if failed:
    say(f"{summary}: {', '.join(p.dir for p in failed)} (see their FAILED files); run the "
        "same command again to retry them")
    return 1
  say(f"all {total} points finished ({summary})")
  return 0


# ----------------------------------------------------------------------------- collecting


def _lower_is_better(metric: str) -> bool:
  return metric.endswith(("medr", "meanr", "loss"))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def collect(root: str) -> dict:
  """Reads ROOT/sweep.json and every point's results.json.

  Returns {"root", "config", "arg", "sweep", "metrics": [names], "points": [{"dir", "group",
  "seed", "status", "detail", "results"}], "groups": [{"label", "name", "reference", "dirs",
  "seeds", "n", "n_planned", "mean": {metric: v}, "std": {metric: v or None}}]} with status
  finished | failed | resumable | new and the sample std (None for fewer than two seeds).
  """
  path = os.path.join(root, SWEEP_FILE)
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; run or emit the sweep into {root} first "
                    "(python launch.py --config ... --sweep --workdir ROOT)")
  try:
    meta = _read_json(path)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is unreadable ({e}); run the sweep again to rewrite it") from None
  points, groups = [], {}
  for p in meta["points"]:
    wd = os.path.join(root, p["dir"])
    status, detail, results = point_status(wd), "", None
    if status == "finished":
      try:
        results = _read_json(os.path.join(wd, "results.json"))
      except (OSError, json.JSONDecodeError) as e:
        status, detail = "failed", f"unreadable results.json ({e})"
    elif status == "failed":
      with open(os.path.join(wd, FAILED_FILE), errors="replace") as f:
        detail = f.readline().strip()
    elif status == "resumable":
      detail = "has a checkpoint; run the sweep again to resume"
    points.append({"dir": p["dir"], "group": p["group"], "seed": p["seed"], "status": status,
                   "detail": detail, "results": results})
    g = groups.setdefault(p["group"], {"label": p["group"], "name": p["name"],
                                       "reference": p["reference"], "dirs": [], "seeds": [],
                                       "n_planned": 0, "_values": []})
    g["n_planned"] += 1
    if results is not None:
      g["dirs"].append(p["dir"])
      g["seeds"].append(p["seed"])
      g["_values"].append({k: float(v) for k, v in results.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)
                           and k not in ("step", "seed")})
  metrics = sorted({m for g in groups.values() for vals in g["_values"] for m in vals})
  for g in groups.values():
    values = g.pop("_values")
    g["n"] = len(values)
    g["mean"], g["std"] = {}, {}
    for m in metrics:
      column = [v[m] for v in values if m in v]
      if column:
        g["mean"][m] = float(np.mean(column))
        g["std"][m] = float(np.std(column, ddof=1)) if len(column) > 1 else None
  return {"root": root, "config": meta.get("config"), "arg": meta.get("arg", ""),
          "sweep": meta.get("sweep", ""), "metrics": metrics, "points": points,
          "groups": list(groups.values())}


def _chosen_metrics(data, metrics):
  if metrics:
    unknown = [m for m in metrics if m not in data["metrics"]]
    if unknown and data["metrics"]:
      raise UserError(f"--metric {unknown[0]!r} is in no results.json of {data['root']}; "
                      f"known: {', '.join(data['metrics'])}")
    return list(metrics)
  chosen = [m for m in DEFAULT_METRICS if m in data["metrics"]]
  return chosen or [m for m in data["metrics"] if m.endswith("/rsum")] or data["metrics"]


def _best(groups, metric):
  values = [g["mean"][metric] for g in groups if metric in g["mean"] and not g["reference"]]
  if not values:
    return None
  return min(values) if _lower_is_better(metric) else max(values)


def format_markdown(data, metrics) -> str:
  """The summary table: mean +- std per group and metric, best in bold, unfinished listed."""
  title = f"{data['config']}{':' + data['arg'] if data['arg'] else ''}, sweep " + (
      repr(data["sweep"]) if data["sweep"] else "(default)")
  lines = [f"# Sweep summary: {title}", "",
           "Mean ± sample std over seeds; n = finished seeds / planned. Best per column in "
           "bold (reference rows excluded; lower is better for medr and meanr).", "",
           "| setting | n | " + " | ".join(metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  best = {m: _best(data["groups"], m) for m in metrics}
  notes = []
  for g in data["groups"]:
    label = g["label"]
    if g["reference"]:
      notes.append(g["reference"])
      label += f" [{len(notes)}]"
    cells = []
    for m in metrics:
      if m not in g["mean"]:
        cells.append("-")
        continue
      text = f"{g['mean'][m]:.2f}" + (f" ± {g['std'][m]:.2f}" if g["std"][m] is not None
                                      else "")
      if not g["reference"] and best[m] is not None and g["mean"][m] == best[m]:
        text = f"**{text}**"
      cells.append(text)
    lines.append(f"| {label} | {g['n']}/{g['n_planned']} | " + " | ".join(cells) + " |")
  if notes:
    lines.append("")
    lines += [f"[{i}] reference row: {note}" for i, note in enumerate(notes, 1)]
  unfinished = [p for p in data["points"] if p["status"] != "finished"]
  if unfinished:
    lines += ["", f"## Not finished ({len(unfinished)} of {len(data['points'])} points)", ""]
    for p in unfinished:
      detail = f": {p['detail']}" if p["detail"] else ""
      lines.append(f"- `{p['dir']}` ({p['group']}) {p['status']}{detail}; log: "
                   f"{p['dir']}/{LOG_FILE}")
  return "\n".join(lines) + "\n"


def write_csv(data, path):
  """One row per group: n, seeds, and mean and std of every metric."""
  header = ["setting", "reference", "n", "n_planned", "seeds"]
  for m in data["metrics"]:
    header += [f"{m}_mean", f"{m}_std"]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for g in data["groups"]:
      row = [g["label"], g["reference"], g["n"], g["n_planned"],
             " ".join(str(s) for s in g["seeds"])]
      for m in data["metrics"]:
        std = g["std"].get(m)
        row += [g["mean"].get(m, ""), "" if std is None else std]
      writer.writerow(row)


def plot(data, metrics, path):
  """Horizontal bars per group (one panel per metric) with std error bars; Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = [g for g in data["groups"] if g["n"]]
  cols = max(1, min(len(metrics), 4))
  rows = max(1, -(-len(metrics) // cols))
  fig, axes = plt.subplots(rows, cols, squeeze=False, sharey=True,
                           figsize=(3.6 * cols + 1.5, 0.4 * max(len(groups), 1) * rows + 1.2))
  for ax in axes.flat[len(metrics):]:
    ax.axis("off")
  if not groups:
    axes.flat[0].text(0.5, 0.5, "no finished points yet", ha="center", va="center")
  for ax, m in zip(axes.flat, metrics):
    shown = [g for g in groups if m in g["mean"]]
    y = np.arange(len(shown))
    ax.barh(y, [g["mean"][m] for g in shown],
            xerr=[g["std"][m] or 0.0 for g in shown], capsize=3,
            color=["0.7" if g["reference"] else "C0" for g in shown])
    ax.set_yticks(y, [f"{g['label']} (n={g['n']})" for g in shown])
    ax.invert_yaxis()
    ax.set_title(m, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_summary(root: str, metrics=None) -> dict:
  """collect(root) and write ROOT/summary.csv, summary.md and summary.png; returns the data."""
  data = collect(root)
  chosen = _chosen_metrics(data, metrics)
  write_csv(data, os.path.join(root, "summary.csv"))
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write(format_markdown(data, chosen))
  plot(data, chosen, os.path.join(root, "summary.png"))
  return data


class _ArgumentParser(argparse.ArgumentParser):

  def error(self, message):
    raise UserError(f"{message}; usage: python -m aeir_jax.sweep collect ROOT "
                    "[--metric target_test/rsum ...]")


def main(argv=None) -> int:
  """python -m aeir_jax.sweep collect ROOT [--metric M ...]"""
  parser = _ArgumentParser(prog="python -m aeir_jax.sweep", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  c = sub.add_parser("collect", help="write ROOT/summary.{csv,md,png} from the points' results")
  c.add_argument("root", help="the sweep's --workdir")
  c.add_argument("--metric", action="append", default=[],
                 help="metric to tabulate and plot (repeatable or comma-separated); default: "
                 "target_test R@1/5/10 both ways and rsum, else every */rsum")
  try:
    args = parser.parse_args(argv)
    metrics = [m for item in args.metric for m in item.split(",") if m]
    data = write_summary(os.path.abspath(args.root), metrics)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finished = sum(p["status"] == "finished" for p in data["points"])
  print(f"{finished}/{len(data['points'])} points finished; wrote summary.csv, summary.md and "
        f"summary.png in {data['root']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
