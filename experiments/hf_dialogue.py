"""Dialogue fine-tuning of a model imported with `python -m gptjax import-hf`.

  python -m gptjax train --config experiments/hf_dialogue.py:IMPORTED --workdir DIR

IMPORTED is the import's workdir: its model keys become this stage's (a stage must keep its
parent's model shape) and its step-0 checkpoint the starting parameters. The data are the
schema_guided_dialogue conversations (or --config.data.train_files=chats.jsonl).
"""

import json
import os

from gptjax import config as config_lib


def get_config(imported: str = ""):
  c = config_lib.base_config()
  c.stage = "dialogue"
  c.init_from = imported
  if imported:
    with open(os.path.join(imported, "config.json")) as f:
      c.model.update(json.load(f)["model"])
  c.data.update(kind="dialogue", dataset="schema_guided_dialogue", eval_split="dev",
                seq_len=min(512, c.model.max_len), eval_batches=20)
  # A pretrained model needs small steps: a learning rate ~10x below pretraining's.
  c.train.update(steps=500, batch_size=16, learning_rate=1e-4, warmup_steps=50,
                 eval_every=100, checkpoint_every=100, weight_decay=0.0)
  return c
