"""Checkpoints: exact round trip, onto the target sharding, and the latest complete step wins."""

import jax
import numpy as np
import pytest
from conftest import compile_programs, make_mesh, tiny_config

from gptjax import checkpoint as ckpt_lib
from gptjax import sharding


def _programs(sizes):
  mesh = sharding.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  return compile_programs(tiny_config(), mesh)


def test_round_trip_restores_the_same_state_onto_another_mesh(tmp_path):
  saver = _programs({"data": 2, "fsdp": 2, "tensor": 2})
  state = saver.init(jax.random.key(3))
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "ckpt"))
  checkpoints.save(7, state)
  checkpoints.wait()
  assert checkpoints.latest_step() == 7

  loader = _programs({"data": 1, "fsdp": 1, "tensor": 1})
  restored = checkpoints.restore(7, loader.abstract_state())
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  leaf = jax.tree.leaves(restored.params)[0]
  assert len(leaf.sharding.device_set) == 1
  checkpoints.close()


def test_an_incomplete_save_is_ignored(tmp_path):
  programs = _programs({"data": 1, "fsdp": 1, "tensor": 1})
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "ckpt"))
  checkpoints.save(2, programs.init(jax.random.key(0)))
  checkpoints.close()
  # What a kill during a save leaves: Orbax's temporary folder for the step being written.
  (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1234").mkdir()
  assert ckpt_lib.Checkpoints(str(tmp_path / "ckpt")).latest_step() == 2


def test_params_restore_alone_whatever_the_optimizer(tmp_path):
  programs = _programs({"data": 2, "fsdp": 1, "tensor": 1})
  state = programs.init(jax.random.key(1))
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "ckpt"))
  checkpoints.save(1, state)
  checkpoints.wait()
  config = tiny_config()
  config.train.grad_clip = 0.0  # Another optimizer state structure.
  mesh = make_mesh()
  abstract = compile_programs(config, mesh).abstract_state().params
  params = checkpoints.restore_params(1, abstract)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("saved, loaded", [((8, 1, 1), (1, 1, 1)), ((2, 2, 2), (1, 4, 2))])
def test_restored_on_another_mesh_the_next_step_is_the_same(tmp_path, saved, loaded):
  from test_train import _batch
  batch = _batch()
  saver = _programs(dict(zip(("data", "fsdp", "tensor"), saved)))
  state = saver.init(jax.random.key(5))
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "ckpt"))
  checkpoints.save(1, state)
  checkpoints.wait()
  _, expected = saver.train_step(state, sharding.global_batch(batch, saver.batch_sharding))

  loader = _programs(dict(zip(("data", "fsdp", "tensor"), loaded)))
  restored = checkpoints.restore(1, loader.abstract_state())
  leaf = restored.params["block_0"]["mlp"]["wi"]
  assert leaf.sharding.mesh.shape == loader.mesh.shape
  _, metrics = loader.train_step(restored, sharding.global_batch(batch, loader.batch_sharding))
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"], rtol=1e-4)
