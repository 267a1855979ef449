"""Benchmarks one AEIR train step: time, throughput, FLOPs and the fraction of matmul peak.

    python bench/train_step.py --config configs/default.py \
        --config.data.source_batch=512 --config.data.target_batch=512
    python bench/train_step.py --config configs/default.py:smoke --num_devices=8
    python bench/train_step.py --config configs/default.py --profile=/tmp/step_profile

Prints the median step time over `--steps` timed steps (compilation and host data excluded),
pairs/s (source + target pairs per second), the step's FLOPs per device from XLA's cost
analysis, the achieved FLOP/s per device, and the peak FLOP/s of a large f32 matmul measured
in the same process on one device (median, timed between the steps), with their ratio.
`--json` writes the same numbers to a file. On a CPU host `--num_devices` fake CPU devices
make the mesh.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so the GRU's
`lax.scan` and the structural loss's blocks (`loss.struct_block_mb`) would be undercounted; the
FLOPs reported here come from the same step compiled without loops (scans unrolled, one
block), which does the same arithmetic.
`--profile=DIR` also writes a `jax.profiler` trace of a few steps to DIR and prints the time
per HLO op, grouped by the source operation (encoders, losses, optimizer) that produced it.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aeir_jax import parallel, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from aeir_jax.data import load_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from aeir_jax.data import samplers  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer("num_devices", 1, "Devices of the mesh (fake CPU devices on a CPU host).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")
flags.DEFINE_string("profile", "", "Write a profiler trace here and print the op breakdown.")
flags.DEFINE_integer("peak_size", 2048, "Side of the square f32 matmul that measures peak.")
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.",
                                lock_config=False)
FLAGS = flags.FLAGS


def make_matmul_peak(device, size=2048):
  """Returns `timed()`: seconds of one `[size, size] @ [size, size]` f32 matmul on `device`,
  and its FLOPs."""
  a = jax.device_put(jnp.linspace(-1.0, 1.0, size * size, dtype=jnp.float32)
                     .reshape(size, size), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()

  def timed():
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    return time.perf_counter() - start

  return timed, 2.0 * size ** 3


def _temp_bytes(compiled):
  """XLA's scratch memory of the compiled step per device (activations, gradients)."""
  analysis = compiled.memory_analysis()
  return int(analysis.temp_size_in_bytes) if analysis is not None else -1


def flops_of(jitted, *args):
  """FLOPs of one call of `jitted(*args)` by XLA's cost analysis, per device (of the program
  each device runs after partitioning)."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def build(config, num_devices):
  """The train state, jitted step and a few device batches, as `train.run` builds them."""

  data = load_data(config)
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  for name in ("source_batch", "target_batch"):
    parallel.check_batch_divisible(f"data.{name}", config.data[name], mesh)
  repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  model, discs = train.build_models(config, data)
  txs = train.build_optimizers(config)
  init = lambda r: train.init_state(config, model, discs, txs, data, r)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state = jax.jit(init, out_shardings=jax.tree.map(lambda _: repl, abstract))(
      jax.random.PRNGKey(config.seed))
  src = samplers.PairedSampler(data.source.train, config.data.source_batch, config.seed)
  tgt = samplers.UnpairedSampler(data.target.train, config.data.target_batch, config.seed)
  batches = [parallel.to_global(
      {"source": samplers.gather(data.source.train, *src.indices(i)),
       "target": samplers.gather(data.target.train, *tgt.indices(i))}, shard) for i in range(4)]
  step = jax.jit(train.make_train_step(config, model, discs, txs, num_devices),
                 donate_argnums=0)
  return state, step, batches, (model, discs, txs, data)


def unrolled_flops(config, state, batch, parts):
  """XLA's FLOPs of the step without loops (see the module docstring)."""
  model, discs, txs, _ = parts
  config = config.copy_and_resolve_references()
  config.loss.struct_block_mb = 0
  rolled_scan = jax.lax.scan
  jax.lax.scan = functools.partial(rolled_scan, unroll=True)
  try:
    return flops_of(jax.jit(train.make_train_step(config, model, discs, txs)), state, batch)
  finally:
    jax.lax.scan = rolled_scan


# Innermost Python function of an op's stack -> the part of the step it belongs to.
COMPONENTS = (
    ("_best_cosine", "structural loss: fragment cosines, max over fragments"),
    ("_masked_cosines", "structural loss: fragment cosines, max over fragments"),
    ("frag_sim_gathered", "structural loss: the K partners"),
    ("frag_sim", "structural loss: fragment cosines, max over fragments"),
    ("_unit", "structural loss: fragment cosines, max over fragments"),
    ("_aggregate", "structural loss: fragment cosines, max over fragments"),
    ("structural_loss", "structural loss: top-K, softmax, KL"),
    ("GRU.__call__.<locals>.step", "text encoder: GRU recurrence (h @ W_hh)"),
    ("GRU.__call__", "text encoder: GRU input projection"),
    ("TextEncoder", "text encoder: embedding, reversal, l2norm"),
    ("reverse_within_length", "text encoder: embedding, reversal, l2norm"),
    ("ImageEncoder", "image encoder"),
    ("CosineHead", "scores + triplet loss"), ("pooled_", "scores + triplet loss"),
    ("triplet_loss", "scores + triplet loss"),
    ("Discriminator", "discriminators + adversarial losses"),
    ("adversarial_losses", "discriminators + adversarial losses"),
    ("pool_fragments", "discriminators + adversarial losses"),
    ("_clip", "gradient clipping, norms"), ("_global_norm", "gradient clipping, norms"),
    ("train_step", "optimizer (Adam), finite check"),
)
CONTAINERS = ("while", "conditional", "call")


def _hlo_tables(hlo_text):
  """{op name: (opcode, innermost-first Python function names)} from compiled HLO text."""
  tables = {"FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
  section, ops = None, {}
  for line in hlo_text.splitlines():
    if line.strip() in tables:
      section = tables[line.strip()]
      continue
    entry = re.match(r"(\d+) (.*)", line)
    if section is not None and entry:
      section[int(entry.group(1))] = entry.group(2)
      continue
    section = None
    op = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\((?:%|\)|\d)", line)
    if op:
      frame = re.search(r"stack_frame_id=(\d+)", line)
      ops[op.group(1)] = (op.group(2), int(frame.group(1)) if frame else 0)
  number = lambda text, key: int(re.search(key + r"=(\d+)", text).group(1))
  functions = {}
  for name, (opcode, frame) in ops.items():
    stack = []
    while frame in tables["StackFrames"] and len(stack) < 64:
      entry = tables["StackFrames"][frame]
      location = tables["FileLocations"][number(entry, "file_location_id")]
      stack.append(tables["FunctionNames"][number(location, "function_name_id")].strip('"'))
      parent = number(entry, "parent_frame_id")
      frame = 0 if parent == frame else parent
    functions[name] = (opcode, stack)
  return functions


def _component(stack):
  for function in stack:
    for key, component in COMPONENTS:
      if key in function:
        return component
  return "other (layout copies, broadcasts)"


def op_breakdown(trace_dir, hlo_text, num_steps, top=12):
  """Milliseconds per step by part of the step and by HLO op, from a profiler trace.

  Each HLO op's time (thunk events of the `jit_train_step` module, loop containers left out
  so nothing counts twice) is attributed to the innermost Python function of its stack.
  """
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  events = json.load(gzip.open(max(paths, key=os.path.getmtime)))["traceEvents"]
  functions = _hlo_tables(hlo_text)
  per_op = collections.Counter()
  for e in events:
    args = e.get("args", {})
    if (e.get("ph") == "X" and "hlo_op" in args
        and args.get("hlo_module", "").startswith("jit_train_step")):
      opcode, _ = functions.get(args["hlo_op"], ("?", []))
      if opcode not in CONTAINERS:
        per_op[args["hlo_op"]] += e["dur"] * 1e-3 / num_steps
  per_component = collections.Counter()
  for name, ms in per_op.items():
    per_component[_component(functions.get(name, ("?", []))[1])] += ms
  ops = [{"op": name, "opcode": functions.get(name, ("?", []))[0],
          "component": _component(functions.get(name, ("?", []))[1]), "ms_per_step": ms}
         for name, ms in per_op.most_common(top)]
  return dict(per_component.most_common()), ops


def main(argv):
  del argv
  jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)
  config = FLAGS.config
  state, step, batches, parts = build(config, FLAGS.num_devices)
  compile_start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_seconds = time.perf_counter() - compile_start
  xla_flops = flops_of(step, state, batches[0])
  flops = unrolled_flops(config, state, batches[0], parts)

  for i in range(FLAGS.warmup):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(state)
  # Steps and peak matmuls alternate, so that both see the same load on a shared host.
  peak_matmul, peak_flops = make_matmul_peak(jax.devices()[0], FLAGS.peak_size)
  times, peak_times = [], []
  for i in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    peak_times.append(peak_matmul())
  seconds = statistics.median(times)
  peak = peak_flops / statistics.median(peak_times)
  pairs = config.data.source_batch + config.data.target_batch
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": FLAGS.num_devices,
      "source_batch": config.data.source_batch, "target_batch": config.data.target_batch,
      "similarity": config.model.similarity, "compute_dtype": config.model.compute_dtype,
      "step_seconds_median": seconds, "step_seconds_min": min(times),
      "pairs_per_second": pairs / seconds, "compile_seconds": compile_seconds,
      "flops_per_step_per_device": flops, "flops_per_step_per_device_xla_rolled": xla_flops,
      "achieved_flops_per_second_per_device": flops / seconds,
      "matmul_peak_flops_per_second": peak,
      "fraction_of_matmul_peak": flops / seconds / peak,
      "loss_encoder": float(jax.device_get(metrics["loss/encoder"])),
      "temp_bytes_per_device": _temp_bytes(compiled),
  }
  if FLAGS.profile:
    with jax.profiler.trace(FLAGS.profile):
      for i in range(3):
        state, metrics = step(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
    components, ops = op_breakdown(FLAGS.profile, compiled.as_text(), 3)
    result["profile_ms_per_step_by_component"] = components
    result["profile_top_ops"] = ops

  print(f"device {result['device']} x{FLAGS.num_devices}, batch {pairs} pairs "
        f"({config.data.source_batch} source + {config.data.target_batch} target), "
        f"{config.model.similarity}, {config.model.compute_dtype}")
  print(f"step        {1e3 * seconds:9.2f} ms median ({1e3 * min(times):.2f} min, "
        f"{FLAGS.steps} steps; compile {compile_seconds:.1f} s)")
  print(f"memory      {result['temp_bytes_per_device'] / 2 ** 20:9.1f} MiB XLA temp per device")
  print(f"throughput  {pairs / seconds:9.0f} pairs/s")
  print(f"FLOPs/step  {flops / 1e9:9.3f} GFLOP per device (XLA, loops unrolled; with loops: "
        f"{xla_flops / 1e9:.3f})")
  print(f"achieved    {flops / seconds / 1e9:9.1f} GFLOP/s per device")
  print(f"matmul peak {peak / 1e9:9.1f} GFLOP/s ({FLAGS.peak_size}^3 f32, same device)")
  print(f"fraction    {result['fraction_of_matmul_peak']:9.3f} of matmul peak")
  if FLAGS.profile:
    components = result["profile_ms_per_step_by_component"]
    print(f"\nprofile ({FLAGS.profile}): {sum(components.values()):.1f} ms/step in HLO ops "
          "(2 threads may overlap), by part of the step:")
    for component, ms in components.items():
      print(f"  {ms:8.1f} ms  {component}")
    print("top ops:")
    for row in result["profile_top_ops"]:
      print(f"  {row['ms_per_step']:8.1f} ms  {row['opcode']:<12} {row['op']:<28} "
            f"{row['component']}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
