"""Pretrain a ~3M-parameter GPT on tfds tiny_shakespeare: a few minutes on a 2-core CPU."""

from gptjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.stage = "pretrain"
  c.model.vocab_size = 1024
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.d_model = 192
  c.model.d_ff = 768
  c.model.max_len = 256
  c.data.dataset = "tiny_shakespeare"
  c.data.seq_len = 256
  c.train.steps = 400
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.log_every = 20
  return c
