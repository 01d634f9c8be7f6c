"""Mesh construction and the logical-axis rules."""

import jax
import jax.numpy as jnp
import pytest

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
