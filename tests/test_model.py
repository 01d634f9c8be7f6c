"""Model behaviour: causality, packed-segment isolation, every configuration knob runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model as model_lib

TINY = dict(vocab_size=61, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=16)


def _logits(cfg, tokens, segment_ids=None, positions=None, seed=0):
  model = model_lib.Transformer(cfg)
  params = model.init(jax.random.key(seed), tokens)["params"]
  return model.apply({"params": params}, tokens, segment_ids, positions)


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("scan", [False, True])
def test_future_tokens_never_change_past_logits(positions, scan):
  cfg = model_lib.ModelConfig(**TINY, positions=positions, scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % 61)
  a, b = _logits(cfg, tokens), _logits(cfg, changed)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
  assert not np.allclose(a[:, 9:], b[:, 9:], atol=1e-3), "later logits should depend on input"


def test_packed_segments_do_not_attend_to_each_other():
  """A document packed after another gives the logits it gives alone."""
  cfg = model_lib.ModelConfig(**TINY, positions="rope")
  doc_a = jax.random.randint(jax.random.key(2), (1, 6), 0, 61)
  doc_b = jax.random.randint(jax.random.key(3), (1, 10), 0, 61)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  alone = _logits(cfg, doc_b)
  together = _logits(cfg, packed, segments, positions)
  np.testing.assert_allclose(together[:, 6:], alone, atol=1e-5)
  # The same packing without segment ids would leak doc_a into doc_b.
  leaky = _logits(cfg, packed, None, positions)
  assert not np.allclose(leaky[:, 6:], alone, atol=1e-3)


@pytest.mark.parametrize("knobs", [
    dict(norm="rmsnorm", mlp="swiglu", positions="rope"),
    dict(use_bias=True, tie_embeddings=False),
    dict(remat="full", scan_layers=True),
    dict(remat="dots"),
    dict(dtype="bfloat16"),
    dict(dropout=0.1),
])
def test_configurations_run(knobs):
  cfg = model_lib.ModelConfig(**TINY, **knobs)
  tokens = jnp.zeros((2, 16), jnp.int32)
  logits = _logits(cfg, tokens)
  assert logits.shape == (2, 16, 61) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_scanned_and_unscanned_parameters_have_the_same_count():
  def count(scan):
    cfg = model_lib.ModelConfig(**TINY, scan_layers=scan)
    shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 16), jnp.int32))
    return sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert count(True) == count(False)


def test_every_parameter_has_logical_axis_names():
  import flax.linen as nn

  from gptjax import config as config_lib
  rules = dict(config_lib.base_config().mesh.rules)
  for scan in (False, True):
    cfg = model_lib.ModelConfig(**TINY, scan_layers=scan, use_bias=True, tie_embeddings=False)
    boxed = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                           jnp.zeros((1, 16), jnp.int32))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 10
    for path, x in leaves:
      name = jax.tree_util.keystr(path)
      assert isinstance(x, nn.Partitioned), f"{name} has no logical axis names"
      assert len(x.names) == x.value.ndim and any(x.names), name
      assert all(n is None or n in rules for n in x.names), f"{name}: {x.names} not in the rules"
      # Scanned blocks stack their layers on a leading "layers" axis; nothing else has one.
      assert (x.names[0] == "layers") == (scan and name.startswith("['blocks']")), name


def test_bad_knob_is_a_clear_error():
  with pytest.raises(ValueError, match="model.norm='batchnorm'"):
    model_lib.ModelConfig(**TINY, norm="batchnorm")
  with pytest.raises(ValueError, match="not divisible by model.num_heads"):
    model_lib.ModelConfig(**{**TINY, "num_heads": 3})
