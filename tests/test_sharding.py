"""Mesh construction and the logical-axis rules."""

import jax
import jax.numpy as jnp
import pytest

from conftest import compile_programs

from gptjax import sharding


def test_minus_one_takes_the_remaining_devices():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"has 3 devices but 8 are available"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, r"at most one -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, r"do not divide the 8 devices"),
])
def test_mesh_that_does_not_fit_the_devices_is_refused(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(sizes, 8)


def test_a_rule_that_does_not_divide_a_dimension_names_the_parameter():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  abstract = {"attn": {"qkv": jax.ShapeDtypeStruct((32, 3, 2, 16), jnp.float32)}}
  spec = jax.sharding.PartitionSpec(None, None, "tensor", None)
  shardings = {"attn": {"qkv": jax.sharding.NamedSharding(mesh, spec)}}
  with pytest.raises(ValueError, match=r"\['attn'\]\['qkv'\].*dimension of 2.*\('tensor',\)"):
    sharding.check_divisible(abstract, shardings, mesh)


def _state_on(shape):
  from conftest import tiny_config

  config = tiny_config()
  config.model.update(num_heads=4, d_model=64, d_ff=128)
  n = shape[0] * shape[1] * shape[2]
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n])
  return compile_programs(config, mesh).init(jax.random.key(0))


def _bytes_on_device(state, device) -> int:
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_params_and_optimizer_state_split_as_the_rules_say(shape):
  data, fsdp, tensor = shape
  state = _state_on(shape)
  mlp = state.params["block_0"]["mlp"]["wi"]  # [embed=64, mlp=128]: embed->fsdp, mlp->tensor.
  assert mlp.addressable_shards[0].data.shape == (64 // fsdp, 128 // tensor)
  embedding = state.params["embedding"]  # [vocab=384, embed=64]: vocab->tensor, embed->fsdp.
  assert embedding.addressable_shards[0].data.shape == (384 // tensor, 64 // fsdp)
  adam = state.opt_state[1][0]
  assert adam.mu["block_0"]["mlp"]["wi"].sharding == mlp.sharding
  assert adam.nu["embedding"].sharding == embedding.sharding


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 4, 2)])
def test_bytes_per_device_fall_with_fsdp_times_tensor(shape):
  one = _state_on((1, 1, 1))
  total = _bytes_on_device(one, jax.devices()[0])
  state = _state_on(shape)
  per_device = max(_bytes_on_device(state, d) for d in jax.devices())
  split = shape[1] * shape[2]
  # Norm scales stay replicated, so a little more than total / split.
  assert total / split <= per_device < 1.1 * total / split, (per_device, total / split)


def test_bench_memory_reports_bytes_per_device_from_the_compiled_step():
  from conftest import tiny_config

  from gptjax import config as config_lib
  from gptjax.bench import memory as bench_memory

  def report(mesh):
    config = tiny_config()
    config.model.update(num_heads=4, d_model=64, d_ff=128)
    config.mesh.update(mesh)
    return bench_memory.run(config=config_lib.stage_config(config))

  replicated = report({"data": 8, "fsdp": 1, "tensor": 1})
  sharded = report({"data": 1, "fsdp": 8, "tensor": 1})
  assert replicated["devices"] == 8 and sharded["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert replicated["param_bytes_per_device"] == 4 * replicated["params"]  # float32, whole.
  assert sharded["param_bytes_per_device"] < replicated["param_bytes_per_device"] / 6
  assert sharded["optimizer_bytes_per_device"] < replicated["optimizer_bytes_per_device"] / 6
  for r in (replicated, sharded):
    assert r["activation_bytes_per_device"] > 0
    assert r["total_bytes_per_device"] >= (r["param_bytes_per_device"]
                                           + r["optimizer_bytes_per_device"])
