"""Multi-host training: two processes on localhost (CPU devices, gloo collectives) train the
smoke config and end with the parameters and logs of one process over the same global batch.

Run as a script, this file is one worker process of that job:
    python tests/test_multihost.py PROCESS_ID NUM_PROCESSES PORT WORKDIR
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aeir_jax import parallel, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default as default_config  # pylint: disable=g-import-not-at-top

DEVICES_PER_PROCESS = 1
NUM_PROCESSES = 2


def _config():
  """The smoke config, cut to two steps, one checkpoint and one evaluation."""
  config = default_config.get_config("smoke")
  with config.unlocked():
    config.train.num_steps = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.eval_every = 2
    config.eval.at_start = False
    config.eval.splits = ("target_test",)
  return config


def _worker(process_id, num_processes, port, workdir):
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert parallel.initialize_distributed(f"localhost:{port}", int(num_processes),
                                         int(process_id))
  assert jax.process_count() == int(num_processes)
  train.run(_config(), workdir)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _gloo_available():
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _final_state(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  path = workdir / "checkpoints" / str(steps[-1]) / "state"
  on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_host),
                          ckptr.metadata(path).item_metadata)
    return steps[-1], ckptr.restore(path, target)


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives, which multi-process CPU runs need")
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  logs = [open(tmp_path / f"process_{i}.log", "w") for i in range(NUM_PROCESSES)]
  workers = [subprocess.Popen([sys.executable, __file__, str(i), str(NUM_PROCESSES), str(port),
                               str(multi)], stdout=log, stderr=subprocess.STDOUT, env=env)
             for i, log in enumerate(logs)]
  # Meanwhile, the reference: one process over as many devices as the two have together.
  train.run(_config(), str(single), devices=jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS])
  for i, worker in enumerate(workers):
    try:
      code = worker.wait(timeout=240)
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      code = "timeout"
    logs[i].close()
    assert code == 0, (f"process {i} exited with {code}:\n"
                       + (tmp_path / f"process_{i}.log").read_text()[-3000:])

  m_step, m_state = _final_state(multi)
  s_step, s_state = _final_state(single)
  assert m_step == s_step == 2
  for key in ("params", "opt"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 m_state[key], s_state[key])
  # Process 0 alone wrote the logs: one record per step and evaluation, as in one process.
  m_records, s_records = _records(multi), _records(single)
  assert [(r["step"], r["kind"]) for r in m_records] == [(r["step"], r["kind"])
                                                         for r in s_records]
  for m, s in zip(m_records, s_records):
    assert m.keys() == s.keys()
    values = lambda r: [r[k] for k in sorted(r) if k != "kind"]
    np.testing.assert_allclose(values(m), values(s), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  _worker(*sys.argv[1:])
