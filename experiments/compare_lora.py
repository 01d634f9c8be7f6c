"""LoRA against full fine-tuning: compare_history_weight.py's dialogue stage (the full
fine-tuning arm, from its pretraining) with LoRA adapters instead, same data, steps and seed.

  python -m gptjax pipeline --config experiments/compare_history_weight.py \
      --workdir runs/compare/baseline                     # full fine-tuning: .../dialogue
  python -m gptjax train --config experiments/compare_lora.py --workdir runs/compare/lora \
      --config.init_from=runs/compare/baseline/pretrain
  python -m gptjax eval --workdir runs/compare/lora --json

Arms (compare_lora.py:ARM): `lora` (rank 8 on every target kernel, plus the chat tokens' rows),
`no_token_rows` (the same without the token rows: the ablation that shows what they buy), and
`full` (the pipeline's full fine-tuning stage alone, e.g. for `bench train` next to `lora`).
"""

from gptjax import config as config_lib

ARMS = ("lora", "no_token_rows", "full")


def get_config(arm: str = "lora"):
  if arm not in ARMS:
    raise ValueError(f"Unknown arm {arm!r} for compare_lora.py; use one of {ARMS}.")
  c = config_lib.sibling(__file__, "compare_history_weight").dialogue  # The baseline pipeline.
  c.init_from = "runs/compare/baseline/pretrain"
  if arm == "full":
    return c
  c.stage = "dialogue_lora"
  c.model.lora.update(rank=8, alpha=16.0, targets="q,k,v,o,mlp_in,mlp_out",
                      train_tokens="chat" if arm == "lora" else "")
  # Adapters start at zero (B) and take larger steps than full fine-tuning's 1e-3: of 5e-3
  # and 1e-2, 1e-2 gave the lower dev assistant_loss (README, "LoRA adapters").
  c.train.learning_rate = 1e-2
  return c
