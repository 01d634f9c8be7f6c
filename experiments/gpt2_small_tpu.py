"""GPT-2 small (124M parameters, seq 1024) on tfds lm1b, for a TPU v4-8 or v5e-8 slice.

bf16 compute, float32 parameters and optimizer state, fully sharded over every chip (FSDP).
Prepare the data once where every worker can read it (a shared or gcsfuse-mounted folder):
  python -m gptjax prepare --dataset lm1b --data_dir /mnt/data/tfds
then launch on every worker (see README, "Launching on TPU VMs and GPU clusters"):
  python -m gptjax train --config experiments/gpt2_small_tpu.py --workdir /mnt/runs/gpt2 \
      --config.data.data_dir=/mnt/data/tfds --distributed
Check it fits first: python -m gptjax bench memory --config experiments/gpt2_small_tpu.py
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.stage = "pretrain"
  c.model.vocab_size = 50_304  # GPT-2's 50,257 rounded up to a multiple of 128.
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.d_model = 768
  c.model.d_ff = 3072
  c.model.max_len = 1024
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True  # One compiled block: fast compiles at depth.
  c.model.remat = "dots"  # Keep matmul outputs, recompute the rest: fits batch 32 a chip.
  c.tokenizer.max_chars = 50_000_000
  c.data.dataset = "lm1b"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.seq_len = 1024
  c.data.eval_batches = 20
  c.train.steps = 20_000
  c.train.batch_size = 128  # ~131K tokens a step.
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 2_000
  c.train.weight_decay = 0.1
  c.train.log_every = 50
  c.train.eval_every = 1_000
  c.train.checkpoint_every = 1_000
  c.mesh.data = 1
  c.mesh.fsdp = -1  # All chips: parameters and optimizer state split 4 or 8 ways.
  c.mesh.tensor = 1
  return c
