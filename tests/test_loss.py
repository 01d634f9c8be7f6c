"""The weighted cross-entropy: weights select and scale tokens exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import loss


def _batch(targets, weights, segment_ids=None, **extra):
  targets = jnp.asarray(targets)
  segment_ids = jnp.ones_like(targets) if segment_ids is None else jnp.asarray(segment_ids)
  return {"targets": targets, "weights": jnp.asarray(weights, jnp.float32),
          "segment_ids": segment_ids, **extra}


def test_loss_sums_match_a_manual_computation():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
  weights = np.array([[1, 1, 0, 0.5, 1], [0, 0, 0, 0, 2.0]])
  segments = np.array([[1, 1, 2, 2, 2], [1, 1, 0, 0, 0]])  # Padding: segment 0.
  sums = loss.loss_sums(logits, _batch(targets, weights, segments))
  logp = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums["loss_sum"], (nll * weights).sum(), rtol=1e-6)
  assert float(sums["weight_sum"]) == 5.5
  assert float(sums["token_count"]) == 7, "padding (segment 0) is not a token"
  np.testing.assert_allclose(loss.means(sums)["loss"], (nll * weights).sum() / 5.5, rtol=1e-6)


def test_zero_weight_tokens_do_not_contribute():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
  weights = [[1.0, 1.0, 0.0, 0.0]]
  sums = loss.loss_sums(logits, _batch([[1, 2, 3, 4]], weights))
  garbage = logits.at[:, 2:].set(1e4)  # Huge logits and other targets on padding: no change.
  sums2 = loss.loss_sums(garbage, _batch([[1, 2, 0, 0]], weights))
  np.testing.assert_allclose(sums["loss_sum"], sums2["loss_sum"], rtol=1e-6)


def test_assistant_loss_counts_reply_tokens_only():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
  batch = _batch([[1, 2, 3, 4]], [[0.5, 0.5, 1.0, 1.0]],
                 assistant=jnp.array([[0.0, 0.0, 1.0, 1.0]]))
  sums = loss.loss_sums(logits, batch)
  nll = loss.token_nll(logits, batch["targets"])[0]
  out = loss.means(sums)
  np.testing.assert_allclose(out["assistant_loss"], (nll[2] + nll[3]) / 2, rtol=1e-6)
  np.testing.assert_allclose(out["loss"], (0.5 * nll[0] + 0.5 * nll[1] + nll[2] + nll[3]) / 3,
                             rtol=1e-6)
