"""Next-token cross-entropy with per-token weights, in float32.

Both stages use this one loss: pretraining weighs every real token 1 and padding 0; the
dialogue stage only builds different weights.
"""

import jax
import jax.numpy as jnp


def token_nll(logits_BLV, targets_BL):
  """Negative log-likelihood of each target token: [B, L] float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return logz_BL - target_logit_BL


def weighted_nll(logits_BLV, targets_BL, weights_BL):
  """(sum of weight * nll, sum of weights): divide the two for the mean loss.

  Returning sums rather than the mean lets gradient accumulation and evaluation add exact
  totals over micro-batches, so their result equals one big batch.
  """
  weights_BL = weights_BL.astype(jnp.float32)
  return (token_nll(logits_BLV, targets_BL) * weights_BL).sum(), weights_BL.sum()
