"""The reference shape of the CPU train benchmark: a 6-layer GPT-2-style model (12.3M
parameters), seq 256, global batch 8, float32, AdamW with clipping.

  python -m gptjax bench train --config experiments/bench_cpu.py
prints tokens/s, MFU and, when PyTorch is installed (`pip install -e .[bench]`), the tokens/s
of the same step in PyTorch eager (benchmarks/torch_gpt.py), measured in the same run.
The benchmark feeds random tokens (speed does not depend on the text), so it reads no data.
"""

from gptjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.stage = "bench"
  # GPT-2 style: pre-LayerNorm, GELU, tied embeddings, learned positions, no biases.
  c.model.update(vocab_size=4096, num_layers=6, num_heads=6, d_model=384, d_ff=1536,
                 max_len=256, dropout=0.0, positions="learned", norm="layernorm", mlp="gelu",
                 use_bias=False, tie_embeddings=True, dtype="float32", param_dtype="float32")
  c.model.attention = "auto"  # "chunked" on the CPU: see gptjax/model.py.
  c.data.seq_len = 256
  c.train.update(batch_size=8, learning_rate=6e-4, warmup_steps=10, weight_decay=0.1,
                 grad_clip=1.0)
  return c
