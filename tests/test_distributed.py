"""Two real JAX processes on the CPU (gloo collectives) train together, checkpoint and resume,
and match one process fed the same global batches."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import (
  ROOT,
  TINY_EXPERIMENT,
  compile_programs,
  free_port,
  make_mesh,
  tiny_config,
)

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import datasets
from gptjax import sharding
from gptjax import workdir as workdir_lib



def _launch_two(experiment, workdir, *overrides):
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "gptjax", "train", "--config", str(experiment), "--workdir",
       str(workdir), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i), *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one(tmp_path, tfds_data_dir):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  workdir = tmp_path / "run"  # No tokenizer: process 0 trains it while process 1 waits.
  flags = [f"--config.data.data_dir={tfds_data_dir}"]
  outs = _launch_two(experiment, workdir, *flags, "--config.train.steps=2")
  assert "Done: pretrain at step 2" in outs[0]
  assert "Done" not in outs[1], "only process 0 prints"
  _launch_two(experiment, workdir, *flags, "--config.train.steps=4")  # Resumes from step 2.
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  assert len(losses) == 4

  # One process on 4 devices, fed the global batches the two processes assembled.
  config = config_lib.stage_config(tiny_config(tfds_data_dir))
  mesh = make_mesh(data=4)
  programs = compile_programs(config, mesh)
  tokenizer = workdir_lib.load_tokenizer(str(workdir))
  shards = [iter(datasets.train_dataset(config, tokenizer, batch_size=4, shard_index=i,
                                        shard_count=2)[0]) for i in range(2)]
  state = programs.init(jax.random.key(config.train.seed))
  expected = []
  for _ in range(4):
    parts = [next(s) for s in shards]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = programs.train_step(state, sharding.global_batch(batch,
                                                                       programs.batch_sharding))
    expected.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, expected, rtol=1e-5)

  # The 2-process checkpoint restores in this one process, onto one device.
  one = make_mesh()
  checkpoints = ckpt_lib.Checkpoints(str(workdir / "checkpoints"), read_only=True)
  restored = checkpoints.restore(4, compile_programs(config, one).abstract_state())
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
