"""The train step and loop: learning, sharding, accumulation, resume, failure handling."""

import functools
import gc
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import compile_programs, make_mesh, run_stage, tiny_config

from gptjax import checkpoint as ckpt_lib
from gptjax import data as data_lib
from gptjax import sharding
from gptjax import train as train_lib



def _batch(seed=0, batch=8, length=32, vocab=384):
  """A synthetic packed batch: two documents a row, the last 4 positions padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, vocab, size=(batch, length + 1), dtype=np.int32)
  seg = np.ones((batch, length), np.int32)
  seg[:, length // 2:] = 2
  seg[:, -4:] = 0
  pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos}


def _step(config, mesh, batch, steps=1):
  programs = compile_programs(config, mesh)
  state = programs.init(jax.random.key(0))
  for _ in range(steps):
    state, metrics = programs.train_step(state, sharding.global_batch(batch,
                                                                       programs.batch_sharding))
  return jax.device_get(state), jax.device_get(metrics)


def test_tiny_model_overfits_one_batch():
  config = tiny_config()
  config.train.update(steps=80, warmup_steps=5, learning_rate=1e-2)
  programs = compile_programs(config, make_mesh())
  state = programs.init(jax.random.key(0))
  batch = sharding.global_batch(_batch(), programs.batch_sharding)
  losses = []
  for _ in range(80):
    state, metrics = programs.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] > 5.5, losses[0]  # About ln(384) = 5.95 at init.
  assert losses[-1] < 0.5, f"a tiny model should memorise one batch, got {losses[-1]:.3f}"


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_step_matches_one_device(shape):
  config = tiny_config()
  config.model.num_heads = 4  # Divisible by tensor=4.
  batch = _batch()
  one_state, one_metrics = _step(config, make_mesh(), batch, steps=2)
  state, metrics = _step(config, make_mesh(*shape), batch, steps=2)
  np.testing.assert_allclose(metrics["loss"], one_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_parameters_are_laid_out_by_the_rules():
  config = tiny_config()
  programs = compile_programs(config, make_mesh(2, 2, 2))
  state = programs.init(jax.random.key(0))
  qkv = state.params["block_0"]["attn"]["qkv"]  # [D=32, 3, H=2, K=16]: embed->fsdp, heads->tensor.
  assert qkv.addressable_shards[0].data.shape == (16, 3, 1, 16)
  mu = state.opt_state[1][0].mu["block_0"]["attn"]["qkv"]  # Adam moments shard like params.
  assert mu.sharding == qkv.sharding


def test_grad_norm_is_the_norm_that_clipping_sees():
  # With frozen embeddings the logged norm is that of the trainable gradients only.
  import optax

  from gptjax import optim
  from gptjax import steps as steps_lib
  batch = _batch()
  config = tiny_config()
  config.train.trainable = "no_embed"
  programs = compile_programs(config, make_mesh())
  state = programs.init(jax.random.key(0))
  grads, _ = jax.grad(functools.partial(steps_lib._loss_sums, model=programs.model, rng=None,
                                        train=False), has_aux=True)(state.params, batch)
  weight = batch["weights"].sum()
  trainable = optim.mask_frozen(grads, "no_embed", 2)
  _, metrics = programs.train_step(state, sharding.global_batch(batch, programs.batch_sharding))
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(trainable) / weight,
                             rtol=1e-4)
  assert optax.global_norm(grads) > 1.01 * optax.global_norm(trainable)


def test_grad_accumulation_equals_the_whole_batch():
  # Uneven weights: even rows (micro-batch 0) are mostly padding, odd rows (micro-batch 1)
  # are full, so a mean of the micro-batches' mean losses is not the batch's mean loss.
  batch = _batch()
  batch["weights"][::2, 4:] = 0.0
  config = tiny_config()
  full_state, full = _step(config, make_mesh(2), batch)
  halves = [_step(config, make_mesh(2), {k: v[i::2] for k, v in batch.items()})[1]["loss"]
            for i in (0, 1)]
  assert abs(np.mean(halves) - full["loss"]) > 1e-3, "the test must tell the two apart"
  config.train.grad_accum_steps = 2
  acc_state, acc = _step(config, make_mesh(2), batch)
  np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(full_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["split"], r["loss"]) for r in rows]


def test_resume_equals_an_uninterrupted_run(tfds_data_dir, workdir, tmp_path):
  config = tiny_config(tfds_data_dir)
  straight = run_stage(config, workdir, mesh=make_mesh(2))

  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))  # Killed after step 2's save.
  resumed = run_stage(config, resumed_dir, mesh=make_mesh(2))

  assert int(resumed.state.step) == 4
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # metrics.jsonl holds each step once: rows after the restored checkpoint are rewritten.
  assert _train_rows(resumed_dir) == _train_rows(workdir)


def test_stopping_and_resuming_equals_an_uninterrupted_run(tfds_data_dir, workdir, tmp_path):
  config = tiny_config(tfds_data_dir)
  straight = run_stage(config, workdir, mesh=make_mesh())
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  shutil.rmtree(os.path.join(other, "checkpoints"))
  os.remove(os.path.join(other, "metrics.jsonl"))
  config.train.steps = 2
  run_stage(config, other, mesh=make_mesh())
  config.train.steps = 4
  resumed = run_stage(config, other, mesh=make_mesh())
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(straight.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tfds_data_dir, workdir):
  config = tiny_config(tfds_data_dir)
  config.train.update(learning_rate=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_every=1,
                      steps=6, log_every=1)
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step (\d+).*untouched") as e:
    run_stage(config, workdir, mesh=make_mesh())
  bad_step = int(e.value.args[0].split("at step ")[1].split(";")[0])
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  assert checkpoints.latest_step() == bad_step - 1
  programs = compile_programs(config, make_mesh())
  state = checkpoints.restore(bad_step - 1, programs.abstract_state())
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_workdir_with_another_model_shape_is_refused(tfds_data_dir, workdir):
  config = tiny_config(tfds_data_dir)
  config.train.steps = 1
  run_stage(config, workdir, mesh=make_mesh())
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  config.model.num_layers = 3
  with pytest.raises(ValueError, match=r"model.num_layers: 2 -> 3.*new --workdir"):
    run_stage(config, workdir, mesh=make_mesh())
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before, "a refused config must not overwrite config.json"


@pytest.mark.parametrize("change, message", [
    (lambda c: c.data.update(seq_len=64), r"data.seq_len=64 is above model.max_len=32"),
    (lambda c: c.train.update(batch_size=6), r"batch_size=6 is not divisible by the "
                                             r"data-parallel size 4"),
    (lambda c: c.train.update(grad_accum_steps=3), r"grad_accum_steps=3 does not divide"),
])
def test_bad_config_is_refused_before_anything_is_written(change, message, tmp_path):
  config = tiny_config()
  change(config)
  with pytest.raises(ValueError, match=message):
    run_stage(config, str(tmp_path / "run"), mesh=make_mesh(4))
  assert not (tmp_path / "run").exists()


def test_missing_dataset_names_the_dataset_and_the_prepare_command(tmp_path):
  config = tiny_config(str(tmp_path / "empty"))
  config.data.dataset = "no_such_dataset"
  with pytest.raises(data_lib.DatasetNotFoundError,
                     match=r"no_such_dataset.*gptjax prepare --dataset no_such_dataset"):
    run_stage(config, str(tmp_path / "run"), mesh=make_mesh())
  assert not (tmp_path / "run").exists()


def test_steady_collector_collects_only_when_asked_and_restores_the_collector():
  collections = []
  callback = lambda phase, info: phase == "start" and collections.append(info["generation"])
  gc.callbacks.append(callback)
  try:
    with train_lib.SteadyCollector() as collector:
      collections.clear()
      assert not gc.isenabled() and gc.get_freeze_count() > 0  # Setup's objects frozen.
      for _ in range(10_000):  # Far past the allocation threshold of a young collection.
        cycle = []
        cycle.append(cycle)
      assert collections == []
      collector.collect(step=3, log_step=False)
      assert collections == []
      collector.collect(step=3, log_step=True)
      collector.collect(step=train_lib.SteadyCollector.EVERY, log_step=False)
      assert collections == [2, 2]
  finally:
    gc.callbacks.remove(callback)
  assert gc.isenabled() and gc.get_freeze_count() == 0


def test_train_loop_runs_steps_with_the_collector_paused(tfds_data_dir, workdir, monkeypatch):
  calls = []
  monkeypatch.setattr(train_lib.SteadyCollector, "collect",
                      lambda self, step, log_step: calls.append((step, log_step, gc.isenabled())))
  config = tiny_config(tfds_data_dir)
  config.train.update(steps=4, log_every=2)
  run_stage(config, workdir, mesh=make_mesh())
  # The first step (it compiled) is followed by a collection before the timing starts.
  assert [(step, log) for step, log, _ in calls] == [(1, True), (1, False), (2, True),
                                                     (3, False), (4, True)]
  assert not any(enabled for _, _, enabled in calls) and gc.isenabled()
