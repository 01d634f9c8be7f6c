"""Optimizer pieces: the schedule's shape and which parameters get weight decay."""

import jax.numpy as jnp
import numpy as np

from gptjax import optim


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
  s = optim.lr_schedule(learning_rate=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  assert 0.1 < float(s(50)) < 1.0
  np.testing.assert_allclose(s(100), 0.1, atol=1e-6)


def test_weight_decay_skips_norms_and_biases():
  params = {"embedding": jnp.ones((4, 2)), "norm_final": {"scale": jnp.ones(2)},
            "block_0": {"mlp": {"wi": jnp.ones((2, 3)), "wi_bias": jnp.ones(3)},
                        "norm_attn": {"scale": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}
  mask = optim.decay_mask(params)
  assert mask["embedding"] and mask["block_0"]["mlp"]["wi"]
  # A scanned norm scale is 2-D ([layers, d_model]) but still must not decay.
  assert not mask["block_0"]["norm_attn"]["scale"]
  assert not (mask["norm_final"]["scale"] or mask["block_0"]["mlp"]["wi_bias"]
              or mask["block_0"]["norm_attn"]["bias"])
