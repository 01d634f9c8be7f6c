"""Dialogue stage on tfds schema_guided_dialogue (customer-service style conversations).

Its model is experiments/shakespeare_pretrain.py's, so it starts from that run:
  python -m gptjax train --config experiments/sgd_dialogue.py --workdir runs/sgd \
      --config.init_from=runs/shakespeare
"""

import os
import runpy


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = runpy.run_path(os.path.join(here, "shakespeare_pretrain.py"))["get_config"]()
  c.stage = "dialogue"
  c.data.kind = "dialogue"
  c.data.dataset = "schema_guided_dialogue"
  c.data.train_split = "train"
  c.data.eval_split = "dev"
  c.data.eval_batches = 8
  c.dialogue.history_weight = 1.0
  c.train.steps = 400
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.patience = 3
  return c
