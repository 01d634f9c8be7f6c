"""Loss by dialogue structure: by speaker role and by the index of the reply in its conversation.

Two per-token fields describe each target of a rendered conversation (dialogue.py's template):

  role  ROLE_CODES: 1 system, 2 user, 3 assistant, 4 template; 0 is padding. A turn's content
        and its closing <|end|> take the turn's role (an assistant's <|end|> is part of the
        reply, as in the `assistant` mask); bos, the role markers and eos are template tokens.
  turn  k >= 1 on the tokens of the conversation's k-th reply, 0 elsewhere. It counts replies
        in the conversation, not in the rendering, so a window that starts late
        (`long_conversations`) or a packed row carries the conversation's own numbers.

Both are built at render time (`role_turn_arrays`), travel through packing as extra
per-token rows like `assistant`, and the loss sums them per bucket (`structure_sums`, in the
jitted step). The metrics (`structure_metrics`) are token-weighted means of the unweighted
next-token loss, with their token counts, under stable names that metrics.jsonl, `eval
--json` and runs.py share:

  loss_role_{system,user,assistant,template}, tokens_role_{...}
  loss_turn_{1..K-1}, loss_turn_{K}plus, tokens_turn_{...}     (K = TURN_BUCKETS)

Turns with no token in the evaluated set are left out rather than reported as 0.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from gptjax import tokenizer as tokenizer_lib

ROLE_CODES = {"system": 1, "user": 2, "assistant": 3, "template": 4}
TURN_BUCKETS = 5  # Replies 1..4 each, then one bucket for the 5th and later.
_MARKERS = {tokenizer_lib.SYSTEM_ID: "system", tokenizer_lib.USER_ID: "user",
            tokenizer_lib.ASSISTANT_ID: "assistant"}


def turn_name(k: int, buckets: int = TURN_BUCKETS) -> str:
  """The bucket name of the k-th reply: "1", ..., "5plus"."""
  return f"{min(k, buckets)}plus" if k >= buckets else str(k)


def metric_names(buckets: int = TURN_BUCKETS) -> list[str]:
  """Every loss name structure_metrics can produce, in display order."""
  return ([f"loss_role_{r}" for r in ROLE_CODES]
          + [f"loss_turn_{turn_name(k, buckets)}" for k in range(1, buckets + 1)])


def role_turn_arrays(tokens: Sequence[int], first_reply: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(role [N], turn [N]) of a rendered conversation's tokens (each describes predicting that
  token, like `Rendered.weights`); its first assistant turn is reply number `first_reply`."""
  role = np.full(len(tokens), ROLE_CODES["template"], np.float32)
  turn = np.zeros(len(tokens), np.float32)
  speaker, reply = None, first_reply - 1
  for i, token in enumerate(tokens):
    if token in _MARKERS:
      speaker = _MARKERS[token]
      reply += speaker == "assistant"
    elif speaker is not None and token not in (tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID):
      role[i] = ROLE_CODES[speaker]
      turn[i] = reply if speaker == "assistant" else 0
      if token == tokenizer_lib.END_ID:
        speaker = None  # The next token is a role marker or eos: template.
  return role, turn


def structure_sums(nll_BL, role_BL, turn_BL, buckets: int = TURN_BUCKETS) -> dict:
  """Summed loss and token count per role and per reply bucket (scalars, so they add up over
  batches like loss.loss_sums' totals)."""
  role_BL, turn_BL = role_BL.astype(jnp.int32), turn_BL.astype(jnp.int32)
  sums = {}
  for name, code in ROLE_CODES.items():
    mask_BL = (role_BL == code).astype(jnp.float32)
    sums[f"role_sum_{name}"], sums[f"role_count_{name}"] = (nll_BL * mask_BL).sum(), mask_BL.sum()
  bucket_BL = jnp.minimum(turn_BL, buckets)
  for k in range(1, buckets + 1):
    mask_BL = (bucket_BL == k).astype(jnp.float32)
    sums[f"turn_sum_{k}"], sums[f"turn_count_{k}"] = (nll_BL * mask_BL).sum(), mask_BL.sum()
  return sums


def structure_metrics(sums: dict, buckets: int = TURN_BUCKETS) -> dict:
  """Means and counts from `structure_sums` totals (host floats); {} when there are none."""
  if "role_sum_user" not in sums:
    return {}
  out = {}
  for name in ROLE_CODES:
    count = sums[f"role_count_{name}"]
    if count:
      out[f"loss_role_{name}"] = sums[f"role_sum_{name}"] / count
      out[f"tokens_role_{name}"] = count
  for k in range(1, buckets + 1):
    count = sums[f"turn_count_{k}"]
    if count:
      out[f"loss_turn_{turn_name(k, buckets)}"] = sums[f"turn_sum_{k}"] / count
      out[f"tokens_turn_{turn_name(k, buckets)}"] = count
  return out
