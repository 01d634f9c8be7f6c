"""Dialogue stage on tfds schema_guided_dialogue (customer-service style conversations).

Its model matches experiments/shakespeare_pretrain.py, so it starts from that run:
  python -m gptjax train --config experiments/sgd_dialogue.py --workdir runs/sgd \
      --config.init_from=runs/shakespeare
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.stage = "dialogue"
  c.model.vocab_size = 1024
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.d_model = 192
  c.model.d_ff = 768
  c.model.max_len = 256
  c.model.dropout = 0.0
  c.data.kind = "dialogue"
  c.data.dataset = "schema_guided_dialogue"
  c.data.train_split = "train"
  c.data.eval_split = "dev"
  c.data.seq_len = 256
  c.data.eval_batches = 8
  c.dialogue.history_weight = 1.0
  c.train.steps = 400
  c.train.batch_size = 16
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.1
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 20
  c.train.patience = 3
  return c
