"""GPT-2 small (124M parameters, seq 1024) on tfds lm1b, for one node of 8 GPUs (or more
nodes: the global batch stays the same and is split over every GPU).

bf16 compute, float32 parameters. Parameters and Adam moments are sharded over the 8 GPUs of
a node (fsdp, fast NVLink) and replicated across nodes (data, slower network).
  python -m gptjax train --config experiments/gpt2_small_gpu.py --workdir /shared/runs/gpt2 \
      --config.data.data_dir=/shared/tfds
Multi-node: the same command on every node with --coordinator_address HOST0:PORT
--num_processes N --process_id I (or --distributed under SLURM).
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
  c.model.scan_layers = True
  c.model.remat = "none"  # 80 GB a GPU holds batch 32 without recomputation.
  c.tokenizer.max_chars = 50_000_000
  c.data.dataset = "lm1b"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.seq_len = 1024
  c.data.eval_batches = 20
  c.train.steps = 20_000
  c.train.batch_size = 256  # ~262K tokens a step; 32 sequences a GPU on 8 GPUs.
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 2_000
  c.train.weight_decay = 0.1
  c.train.log_every = 50
  c.train.eval_every = 1_000
  c.train.checkpoint_every = 1_000
  c.mesh.data = -1
  c.mesh.fsdp = 8  # Within a node: shard parameters and Adam moments over its 8 GPUs.
  c.mesh.tensor = 1
  return c
