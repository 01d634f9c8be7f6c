"""FLOP counts of the model's train step and of decoding one token.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6N for the forward and
backward matmuls of the N parameters (position embeddings excluded: they are added, not
multiplied) plus 12 * layers * heads * head_dim * seq_len for attention, which counts the
whole L x L score matrix; the `_causal` variants count the half that causal attention needs.
"""

import jax

from gptjax import model as model_lib


def weight_matmul_shapes(cfg: model_lib.ModelConfig) -> list[tuple[int, int]]:
  """(inputs, outputs) of each matmul with a weight in the forward pass: every layer's fused
  qkv, attention output and MLP projections, then the output head."""
  D, F = cfg.d_model, cfg.d_ff
  mlp = [(D, F), (D, F), (F, D)] if cfg.mlp == "swiglu" else [(D, F), (F, D)]
  return [(D, 3 * D), (D, D), *mlp] * cfg.num_layers + [(D, cfg.vocab_size)]



def decode_flops_per_token(cfg: model_lib.ModelConfig, context: float) -> float:
  """Forward FLOPs to decode one token: 2 per matmul weight, plus attention over `context`."""
  weights = sum(n_in * n_out for n_in, n_out in weight_matmul_shapes(cfg))
  attention = 2 * 2 * cfg.d_model * context  # q.k and p.v.
  return 2 * weights + cfg.num_layers * attention



def train_flops_per_token(cfg: model_lib.ModelConfig, params, seq_len: int) -> dict:
  """PaLM's model FLOPs per token of a train step (see the module docstring)."""
  n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
          if all(getattr(k, "key", None) != "pos_embedding" for k in path))
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return {"params_counted": int(n), "flops_per_token": int(6 * n + attention),
          "flops_per_token_causal": int(6 * n + attention // 2)}


