"""Dialogue stage on tfds schema_guided_dialogue (customer-service style conversations).

Its model is experiments/shakespeare_pretrain.py's, so it starts from that run:
  python -m gptjax train --config experiments/sgd_dialogue.py --workdir runs/sgd \
      --config.init_from=runs/shakespeare
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "shakespeare_pretrain")
  c.stage = "dialogue"
  c.data.kind = "dialogue"
  c.data.dataset = "schema_guided_dialogue"
  c.data.train_split = "train"
  c.data.eval_split = "dev"
  c.data.eval_batches = 8
  c.dialogue.history_weight = 1.0
  # At seq_len 256, "recent" cuts 77% of the train conversations and drops 36% of the reply
  # tokens; windows train every reply (23,297 windows from 12,174 conversations, packed whole
  # at about 92% of the row capacity).
  c.dialogue.long_conversations = "windows"
  c.train.steps = 400
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.patience = 3
  return c
