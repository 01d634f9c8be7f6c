"""Next-token cross-entropy with per-token weights, in float32.

Both stages use this one loss: pretraining weighs every real token 1 and padding 0; the
dialogue stage weighs reply tokens 1 and history tokens `history_weight`, and its batches
carry an `assistant` mask so the reply-only loss is reported on the same footing whatever the
weights.
"""

import jax
import jax.numpy as jnp

from gptjax import dialogue_loss


def token_nll(logits_BLV, targets_BL):
  """Negative log-likelihood of each target token: [B, L] float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return logz_BL - target_logit_BL


def loss_sums(logits_BLV, batch) -> dict:
  """Sums for the objective (`loss_sum` / `weight_sum`), the count of targets that are not
  padding (`token_count`) and, for dialogue batches, for the assistant tokens alone
  (`assistant_sum` / `assistant_count`).

  Sums rather than means let gradient accumulation and evaluation add exact totals over
  micro-batches, so their result equals one big batch.
  """
  nll_BL = token_nll(logits_BLV, batch["targets"])
  weights_BL = batch["weights"].astype(jnp.float32)
  sums = {"loss_sum": (nll_BL * weights_BL).sum(), "weight_sum": weights_BL.sum(),
          "token_count": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}
  if "assistant" in batch:
    assistant_BL = batch["assistant"].astype(jnp.float32)
    sums["assistant_sum"] = (nll_BL * assistant_BL).sum()
    sums["assistant_count"] = assistant_BL.sum()
  if "role" in batch:  # Loss by dialogue structure (gptjax/dialogue_loss.py).
    sums.update(dialogue_loss.structure_sums(nll_BL, batch["role"], batch["turn"]))
  return sums


def means(sums: dict) -> dict:
  """Mean losses from summed totals: `loss` and, if present, `assistant_loss`."""
  out = {"loss": sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)}
  if "assistant_sum" in sums:
    out["assistant_loss"] = sums["assistant_sum"] / jnp.maximum(sums["assistant_count"], 1.0)
  return out
