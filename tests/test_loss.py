"""The weighted cross-entropy: weights select and scale tokens exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import loss


def test_weighted_nll_matches_a_manual_computation():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
  weights = jnp.array([[1, 1, 0, 0.5, 1], [0, 0, 0, 0, 2.0]])
  total, denom = loss.weighted_nll(logits, targets, weights)
  logp = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(total, (nll * weights).sum(), rtol=1e-6)
  assert float(denom) == 5.5


def test_zero_weight_tokens_do_not_contribute():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
  targets = jnp.array([[1, 2, 3, 4]])
  weights = jnp.array([[1.0, 1.0, 0.0, 0.0]])
  total, _ = loss.weighted_nll(logits, targets, weights)
  garbage = logits.at[:, 2:].set(1e4)  # Huge logits on padding change nothing.
  total2, _ = loss.weighted_nll(garbage, targets.at[:, 2:].set(0), weights)
  np.testing.assert_allclose(total, total2, rtol=1e-6)


def test_assistant_loss_counts_reply_tokens_only():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
  batch = {"targets": jnp.array([[1, 2, 3, 4]]), "weights": jnp.array([[0.5, 0.5, 1.0, 1.0]]),
           "assistant": jnp.array([[0.0, 0.0, 1.0, 1.0]])}
  sums = loss.loss_sums(logits, batch)
  nll = loss.token_nll(logits, batch["targets"])[0]
  out = loss.means(sums)
  np.testing.assert_allclose(out["assistant_loss"], (nll[2] + nll[3]) / 2, rtol=1e-6)
  np.testing.assert_allclose(out["loss"], (0.5 * nll[0] + 0.5 * nll[1] + nll[2] + nll[3]) / 3,
                             rtol=1e-6)
