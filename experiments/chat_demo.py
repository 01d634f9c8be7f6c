"""The two-stage demo: a tokenizer, pretraining on tiny_shakespeare plus dialogue transcripts,
then the dialogue stage on schema_guided_dialogue. About 15 minutes on a 2-core CPU:
  python -m gptjax pipeline --config experiments/chat_demo.py --workdir runs/chat_demo
"""

import ml_collections

from gptjax import config as config_lib


def get_config():
  pretrain = config_lib.sibling(__file__, "shakespeare_pretrain")
  # Dialogue transcripts in pretraining teach the model the domain's words; their own dev
  # split keeps them out of the dialogue stage's held-out conversations.
  pretrain.data.dataset = "tiny_shakespeare,schema_guided_dialogue:train:dev"
  pretrain.tokenizer.max_chars = 3_000_000
  pretrain.train.steps = 300
  pretrain.train.eval_every = 100
  pretrain.train.checkpoint_every = 100
  pretrain.data.eval_batches = 8

  dialogue = config_lib.sibling(__file__, "sgd_dialogue")
  dialogue.train.steps = 400

  c = ml_collections.ConfigDict()
  c.stages = ("pretrain", "dialogue")  # Run in order, each in DIR/<stage>/.
  c.tokenizer_stage = "pretrain"  # Whose training texts train the shared tokenizer.
  c.pretrain = pretrain
  c.dialogue = dialogue
  c.num_samples = 3  # Held-out conversations the finished model replies to.
  return c
