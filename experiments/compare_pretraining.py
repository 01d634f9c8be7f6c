"""Dialogue fine-tuning from a pretrained checkpoint against from scratch, on `assistant_loss`.

The pretrained arm is the baseline of experiments/compare_history_weight.py (reuse that run if
you have it); the scratch arm trains the same dialogue stage from random parameters with the
baseline's tokenizer, since per-token losses compare only under the same tokenizer:
  python -m gptjax pipeline --config experiments/compare_pretraining.py \
      --workdir runs/compare/baseline
  mkdir -p runs/compare/scratch && cp runs/compare/baseline/tokenizer.model runs/compare/scratch/
  python -m gptjax train --config experiments/compare_pretraining.py:scratch \
      --workdir runs/compare/scratch
"""

from gptjax import config as config_lib


def get_config(arm: str = "pretrained"):
  c = config_lib.sibling(__file__, "compare_history_weight", "baseline")
  if arm == "pretrained":
    return c  # A pipeline config: run it with `python -m gptjax pipeline`.
  if arm == "scratch":
    return c.dialogue  # One stage, init_from "": random parameters.
  raise ValueError(f"Unknown arm {arm!r} for compare_pretraining.py; use no arm (the "
                   "pretrained pipeline) or compare_pretraining.py:scratch.")
