"""What imported models need from the model: grouped-query attention, q/k/v biases, the norm
epsilon; each checked against an equivalent the model already had."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sharding

TINY = {"vocab_size": 61, "num_layers": 2, "num_heads": 4, "d_model": 32, "d_ff": 64, "max_len": 16,
            "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


def _init(cfg, seed=0):
  model = model_lib.Transformer(cfg)
  return model, nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def _as_multi_head(params, groups: int):
  """GQA parameters as the fused multi-head layout, each k/v head repeated `groups` times."""
  out = {}
  for name, p in params.items():
    if not name.startswith("block_"):
      out[name] = p
      continue
    attn = dict(p["attn"])
    q, kv = attn.pop("q"), attn.pop("kv")
    kv = jnp.repeat(kv, groups, axis=2)
    attn["qkv"] = jnp.concatenate([q[:, None], kv], axis=1)
    if "q_bias" in attn:
      q_b, kv_b = attn.pop("q_bias"), jnp.repeat(attn.pop("kv_bias"), groups, axis=1)
      attn["qkv_bias"] = jnp.concatenate([q_b[None], kv_b], axis=0)
    out[name] = {**p, "attn": attn}
  return out


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads(qkv_bias):
  cfg = model_lib.ModelConfig(**TINY, num_kv_heads=2, qkv_bias=qkv_bias)
  model, params = _init(cfg)
  attn = params["block_0"]["attn"]
  assert attn["q"].shape == (32, 4, 8) and attn["kv"].shape == (32, 2, 2, 8)
  assert ("q_bias" in attn) == qkv_bias and "out_bias" not in attn
  if qkv_bias:  # Non-zero biases, so the test sees them.
    params = jax.tree.map(lambda x: x + 0.1, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  mha = model_lib.Transformer(dataclasses.replace(cfg, num_kv_heads=0))
  np.testing.assert_allclose(model.apply({"params": params}, tokens),
                             mha.apply({"params": _as_multi_head(params, 2)}, tokens),
                             atol=1e-5, rtol=1e-5)


def test_qkv_bias_alone_adds_only_projection_biases():
  _, params = _init(model_lib.ModelConfig(**TINY, qkv_bias=True))
  block = params["block_0"]
  assert block["attn"]["qkv_bias"].shape == (3, 4, 8)
  assert "out_bias" not in block["attn"] and "wo_bias" not in block["mlp"]


@pytest.mark.parametrize("scan", [False, True])
def test_gqa_cached_decoding_matches_the_forward_pass_and_caches_only_kv_heads(scan):
  cfg = model_lib.ModelConfig(**TINY, num_kv_heads=1, scan_layers=scan)
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 61)
  full = model.apply({"params": params}, tokens)
  if scan:
    params = model_lib.unstack_layers(params)
  decoder = model_lib.Transformer(dataclasses.replace(cfg, scan_layers=False))
  cache = model_lib.init_cache(decoder.cfg, jnp.array([0]), 10)
  assert cache.k_BHSK[0].shape == (1, 1, 10, 8)
  got = []
  for lo, hi in [(0, 4)] + [(c, c + 1) for c in range(4, 10)]:
    logits, cache = decoder.apply({"params": params}, tokens[:, lo:hi], cache=cache)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), full, atol=2e-5, rtol=1e-5)


def test_norm_eps_reaches_the_norm():
  cfg = model_lib.ModelConfig(**TINY)
  model, params = _init(cfg)
  tokens = jnp.arange(8)[None]
  a = model.apply({"params": params}, tokens)
  b = model_lib.Transformer(dataclasses.replace(cfg, norm_eps=1.0)).apply({"params": params},
                                                                          tokens)
  assert not np.allclose(a, b, atol=1e-3)


def test_gqa_shards_kv_heads_over_the_tensor_axis():
  cfg = model_lib.ModelConfig(**TINY, num_kv_heads=2)
  mesh = make_mesh(data=4, tensor=2)
  rules = sharding.rules_tuple(config_lib.base_config().mesh.rules)
  boxed = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                         jnp.zeros((1, 8), jnp.int32))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  assert shardings["block_0"]["attn"]["kv"].spec[2] == "tensor"
  with pytest.raises(ValueError, match="do not divide"):
    sharding.check_divisible(nn.unbox(boxed), sharding.logical_shardings(
        jax.eval_shape(model_lib.Transformer(dataclasses.replace(cfg, num_kv_heads=1)).init,
                       jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"], mesh,
        rules), mesh)


def test_bad_num_kv_heads_is_a_one_line_error():
  with pytest.raises(ValueError, match="does not divide model.num_heads"):
    model_lib.ModelConfig(**TINY, num_kv_heads=3)
