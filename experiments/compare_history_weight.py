"""Dialogue regression against replies-only training: `dialogue.history_weight` 1.0 vs 0.0.

Both arms fine-tune the same pretrained checkpoint on schema_guided_dialogue; they differ only
in the weight of non-assistant tokens, so compare them on `assistant_loss` (their `loss`
averages over different tokens). The chat demo at a few CPU minutes an arm:
  python -m gptjax pipeline --config experiments/compare_history_weight.py \
      --workdir runs/compare/baseline
  python -m gptjax train --config experiments/compare_history_weight.py:replies_only \
      --workdir runs/compare/replies_only --config.init_from=runs/compare/baseline/pretrain
"""

import ml_collections

from gptjax import config as config_lib


def baseline() -> ml_collections.ConfigDict:
  """experiments/chat_demo.py with fewer steps: pretrain, then dialogue with history_weight 1."""
  c = config_lib.sibling(__file__, "chat_demo")
  c.pretrain.train.update(steps=150, eval_every=50, checkpoint_every=50, log_every=10)
  # Frequent evals give the comparison curves enough points; patience 0 lets every arm run
  # its full budget, so they end at the same token count.
  c.dialogue.train.update(steps=120, log_every=10, eval_every=20, checkpoint_every=60,
                          patience=0)
  c.num_samples = 0
  return c


def get_config(arm: str = "baseline"):
  c = baseline()
  if arm == "baseline":
    return c  # A pipeline config: run it with `python -m gptjax pipeline`.
  if arm == "replies_only":
    c.dialogue.dialogue.history_weight = 0.0
    return c.dialogue  # One stage: needs --config.init_from=<baseline>/pretrain.
  raise ValueError(f"Unknown arm {arm!r} for compare_history_weight.py; use no arm (the "
                   "baseline pipeline) or compare_history_weight.py:replies_only.")
