"""experiments/gpt2_small_gpu.py shrunk to seconds on a CPU: the dry run of the GPU check.

  python -m gptjax.bench.gpu_check /tmp/gpu_check --tiny
runs every part of the GPU check (gptjax/bench/gpu_check.py) on this config instead of GPT-2
small, so a broken flag, command or result file shows here, before any device time. Same
settings as the GPU config (bf16 compute, float32 parameters, scanned layers, no remat), a
2-layer d_model 64 model; its numbers mean nothing.
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.sibling(__file__, "gpt2_small_gpu")
  c.model.update(vocab_size=512, num_layers=2, num_heads=2, d_model=64, d_ff=256, max_len=128)
  c.data.seq_len = 64
  c.train.batch_size = 8
  return c
