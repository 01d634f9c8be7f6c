"""A PyTorch reference train step of the shape gptjax benchmarks, to compare on one machine.

The model is what `experiments/bench_cpu.py` configures in gptjax: a pre-LayerNorm GPT-2
(GELU with the tanh approximation, tied embeddings, learned positions, no biases), causal
`scaled_dot_product_attention`, cross-entropy, global-norm clipping at 1.0 and AdamW (fused),
run in eager mode as most PyTorch research code is. It is written from the shape alone and
shares no code with gptjax.

  pip install -e .[bench]   # torch, a benchmark-only extra
  python -m gptjax.bench.torch_gpt [--layers 6 --heads 6 --d_model 384 --seq_len 256 ...]

prints one JSON object: the median step time over the timed steps and tokens/s.
`python -m gptjax bench train` runs this file in a subprocess (so the two frameworks' thread
pools never compete for the cores) and reports the ratio of the two rates.
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
  """x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, d_model: int, heads: int, d_ff: int):
    super().__init__()
    self.heads = heads
    self.ln_attn = nn.LayerNorm(d_model, bias=False)
    self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
    self.out = nn.Linear(d_model, d_model, bias=False)
    self.ln_mlp = nn.LayerNorm(d_model, bias=False)
    self.wi = nn.Linear(d_model, d_ff, bias=False)
    self.wo = nn.Linear(d_ff, d_model, bias=False)

  def forward(self, x_BLD):
    B, L, D = x_BLD.shape
    qkv = self.qkv(self.ln_attn(x_BLD)).view(B, L, 3, self.heads, D // self.heads)
    q_BHLK, k_BHLK, v_BHLK = qkv.permute(2, 0, 3, 1, 4)
    y_BHLK = F.scaled_dot_product_attention(q_BHLK, k_BHLK, v_BHLK, is_causal=True)
    x_BLD = x_BLD + self.out(y_BHLK.transpose(1, 2).reshape(B, L, D))
    return x_BLD + self.wo(F.gelu(self.wi(self.ln_mlp(x_BLD)), approximate="tanh"))


class GPT(nn.Module):
  """tokens [B, L] -> logits [B, L, V]."""

  def __init__(self, vocab: int, layers: int, heads: int, d_model: int, d_ff: int,
               max_len: int):
    super().__init__()
    self.embed = nn.Embedding(vocab, d_model)
    self.pos = nn.Embedding(max_len, d_model)
    self.blocks = nn.ModuleList(Block(d_model, heads, d_ff) for _ in range(layers))
    self.ln_final = nn.LayerNorm(d_model, bias=False)
    # GPT-2 init: N(0, 0.02), projections into the residual stream scaled by 1/sqrt(2 layers).
    for name, p in self.named_parameters():
      if p.dim() == 2:
        residual = name.endswith(("out.weight", "wo.weight"))
        nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if residual else 0.02)

  def forward(self, tokens_BL):
    x_BLD = self.embed(tokens_BL) + self.pos(torch.arange(tokens_BL.shape[1]))
    for block in self.blocks:
      x_BLD = block(x_BLD)
    return self.ln_final(x_BLD) @ self.embed.weight.T  # Tied head.


def measure(*, vocab=4096, layers=6, heads=6, d_model=384, d_ff=1536, seq_len=256, batch=8,
            steps=20, warmup=3, threads=0, seed=0) -> dict:
  """Tokens/s of the eager train step (median over `steps` after `warmup`)."""
  torch.manual_seed(seed)
  torch.set_num_threads(threads or os.cpu_count())
  model = GPT(vocab, layers, heads, d_model, d_ff, seq_len)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  # fused=True: one kernel for the whole update, the fastest AdamW PyTorch has on the CPU.
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
  tokens = torch.randint(0, vocab, (batch, seq_len + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()  # Eager PyTorch on the CPU is synchronous; item() ends the step.

  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
          "params": sum(p.numel() for p in model.parameters()),
          "step_ms": round(1000 * step_s, 2), "tokens_per_sec": round(batch * seq_len / step_s, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  for name, default in [("vocab", 4096), ("layers", 6), ("heads", 6), ("d_model", 384),
                        ("d_ff", 1536), ("seq_len", 256), ("batch", 8), ("steps", 20),
                        ("warmup", 3), ("threads", 0)]:
    parser.add_argument(f"--{name}", type=int, default=default)
  print(json.dumps(measure(**vars(parser.parse_args()))))


if __name__ == "__main__":
  main()
