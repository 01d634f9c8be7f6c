"""GPT-2 small (124M parameters, seq 1024) on tfds lm1b, for one node of 8 GPUs (or more
nodes: the global batch stays the same and is split over every GPU). The model and data are
experiments/gpt2_small_tpu.py's.

bf16 compute, float32 parameters. Parameters and Adam moments are sharded over the 8 GPUs of
a node (fsdp, fast NVLink) and replicated across nodes (data, slower network).
  python -m gptjax train --config experiments/gpt2_small_gpu.py --workdir /shared/runs/gpt2 \
      --config.data.data_dir=/shared/tfds
Multi-node: the same command on every node with --coordinator_address HOST0:PORT
--num_processes N --process_id I (or --distributed under SLURM).
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "gpt2_small_tpu")
  c.model.remat = "none"  # 80 GB a GPU holds batch 32 without recomputation.
  c.train.batch_size = 256  # ~262K tokens a step; 32 sequences a GPU on 8 GPUs.
  c.mesh.data = -1
  c.mesh.fsdp = 8  # Within a node: shard parameters and Adam moments over its 8 GPUs.
  c.mesh.tensor = 1
  return c
