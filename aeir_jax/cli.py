"""Command-line handling for launch.py: flags, config loading, sweeps, clean errors."""

from __future__ import annotations

import difflib
import importlib.util
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from aeir_jax import config_lib
from aeir_jax.errors import ConfigError, UserError, WorkdirError

EXIT_USER_ERROR = 2
EXIT_NUMERICAL = 3
SWEEP_FLAGS = ("parallel", "dry-run", "emit", "slurm-args", "launcher")


def _define_flags(argv):
  fl = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.",
                                  flag_values=fl, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results (with "
                      "--sweep: the sweep's root, one subdirectory per point).", flag_values=fl)
  flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                      "(default: $JAX_COORDINATOR_ADDRESS or auto-detected on TPU/SLURM).",
                      flag_values=fl)
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                       flag_values=fl)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fl)
  flags.DEFINE_string("sweep", None, "Run the named sweep of the config file's sweep(name); "
                      "--sweep alone runs its default sweep.", flag_values=fl)
  flags.DEFINE_integer("parallel", 1, "Sweep points run at a time (locally).", lower_bound=1,
                       flag_values=fl)
  flags.DEFINE_bool("dry-run", False, "List the sweep's points and command lines; run nothing.",
                    flag_values=fl)
  flags.DEFINE_enum("emit", None, ["slurm", "shell"], "Write job scripts instead of running: "
                    "slurm (one sbatch script per point + submit_all.sh) or shell "
                    "(commands.sh, one command per line).", flag_values=fl)
  flags.DEFINE_string("slurm-args", "", "Extra sbatch options for --emit slurm, e.g. "
                      "'--gres=gpu:1 --time=04:00:00 --mem=32G'.", flag_values=fl)
  flags.DEFINE_string("launcher", "", "Command that runs a point instead of 'python launch.py', "
                      "e.g. 'srun python launch.py' (default: this Python and launch.py).",
                      flag_values=fl)
  return fl


def _bare_sweep(argv):
  """Lets `--sweep` stand alone (the default sweep): rewrites it to `--sweep=`."""
  out = list(argv)
  for i, token in enumerate(out[1:], 1):
    if token in ("--sweep", "-sweep") and (i + 1 == len(out) or out[i + 1].startswith("-")):
      out[i] = "--sweep="
  return out


def _config_arg(argv):
  """The value of --config in argv ('path[:arg]'), or None."""
  for i, token in enumerate(argv):
    if token.startswith("--config="):
      return token.split("=", 1)[1]
    if token == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(spec):
  """Imports a config file and calls its get_config(arg), without any overrides."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_aeir_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_field_message(argv):
  """For a --config.a.b=v naming no field: which one, and the closest existing names."""
  config = _load_config_file(_config_arg(argv))
  for token in argv:
    if not token.startswith("--config."):
      continue
    dotted = token[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in dotted.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(walked) or "the config"
        close = difflib.get_close_matches(part, keys, n=2)
        hint = f"; did you mean {' or '.join('.'.join(walked + [c]) for c in close)}?" \
            if close else f"; {where} has: {', '.join(sorted(keys))}"
        return f"--config.{dotted}: {where} has no field {part!r}{hint}"
      node, walked = node[part], walked + [part]
  return None


def _parse(argv):
  """Parses flags; any problem with them becomes a ConfigError with one line."""
  argv = _bare_sweep(argv)
  spec = _config_arg(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    raise ConfigError(f"config file {spec.partition(':')[0]} not found; pass an existing "
                      "file, e.g. --config configs/default.py")
  fl = _define_flags(argv)
  try:
    fl(argv)
  except flags.Error as e:
    raise ConfigError(_flag_error_message(str(e))) from None
  except (AttributeError, KeyError) as e:
    message = _unknown_field_message(argv) if spec else None
    raise ConfigError(message or f"bad --config override: {e}") from None
  if fl["config"].value is None:
    raise ConfigError("--config is required, e.g. --config configs/default.py")
  if not fl.workdir:
    raise ConfigError("--workdir is required, e.g. --workdir runs/default")
  if fl.sweep is None:
    given = [f"--{name}" for name in SWEEP_FLAGS if fl[name].present]
    if given:
      raise ConfigError(f"{', '.join(given)}: only for sweeps; add --sweep [NAME]")
  return fl


def _flag_error_message(text: str) -> str:
  text = " ".join(text.split())
  if "Could not find" in text or "does not exist" in text or "No such file" in text:
    return f"{text}. Check the --config path (e.g. configs/default.py)"
  if "override" in text.lower() or "key" in text.lower():
    return f"{text}. Check the spelling of the --config.* field (see the config file)"
  return text


def _check_point(point):
  """Parses a sweep point's launch.py arguments as launch.py would and validates its config."""
  try:
    config_lib.validate(_parse(["launch.py", *point.args]).config)
  except ConfigError as e:
    raise ConfigError(f"sweep point {point.dir}: {e}") from None


def _sweep(fl) -> int:
  """--sweep: expands the config's sweep and lists, emits or runs its points."""
  from aeir_jax import sweep  # pylint: disable=g-import-not-at-top
  config_path, _, base_arg = config_flags.get_config_filename(fl["config"]).partition(":")
  if fl["slurm-args"].present and fl.emit != "slurm":
    raise ConfigError("--slurm-args only applies with --emit slurm")
  if fl["parallel"].present and fl.emit:
    raise ConfigError("--parallel applies to local runs; drop it with --emit (for emitted "
                      "commands.sh use xargs -P N)")
  root = os.path.abspath(fl.workdir)
  launcher = shlex.split(fl.launcher) if fl.launcher else sweep.default_launcher()
  points = sweep.load_points(config_path, fl.sweep)
  sweep.attach_commands(points, config_path, base_arg,
                        config_flags.get_override_values(fl["config"]), root, launcher)
  for point in points:
    _check_point(point)
  if fl["dry-run"].value:
    sweep.print_plan(points, root)
    return 0
  try:
    sweep.write_sweep_file(root, points, {"config": config_path, "arg": base_arg,
                                          "sweep": fl.sweep})
  except OSError as e:
    raise WorkdirError(f"cannot write the sweep root {root} ({e.strerror}); pass a --workdir "
                       "you can write to") from None
  if fl.emit == "slurm":
    prefix = "-".join(filter(None, (os.path.splitext(os.path.basename(config_path))[0],
                                    fl.sweep)))
    paths = sweep.emit_slurm(points, root, fl["slurm-args"].value, job_prefix=prefix)
    print(f"wrote {len(points)} sbatch scripts; submit them with: bash {paths[-1]}")
    return 0
  if fl.emit == "shell":
    path = sweep.emit_shell(points, root)
    print(f"wrote {path}; run it with: xargs -d '\\n' -P 4 -I{{}} bash -c {{}} < {path}")
    return 0
  print(f"[sweep] {len(points)} points of {config_path} in {root}", flush=True)
  return sweep.run_points(points, root, parallel=fl.parallel)


def main(argv) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    fl = _parse(argv)
    if fl.sweep is not None:
      return _sweep(fl)
    from aeir_jax import parallel, train  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed(fl.coordinator_address, fl.num_processes, fl.process_id)
    try:
      result = train.run(fl.config, fl.workdir)
    except train.NumericalError as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_NUMERICAL
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0 if result else 1
