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



def _matmul_params(params) -> int:
  return sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
             if all(getattr(k, "key", None) != "pos_embedding" for k in path))


def train_flops_per_token(cfg: model_lib.ModelConfig, params, seq_len: int,
                          frozen=None) -> dict:
  """PaLM's model FLOPs per token of a train step (see the module docstring). `frozen`: the
  parameters a LoRA step uses but does not train (its base), 4 FLOPs each per token, for
  the forward and the input gradient; it has no weight gradient."""
  n = _matmul_params(params)
  n_frozen = 0 if frozen is None else _matmul_params(frozen)
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  matmuls = 6 * n + 4 * n_frozen
  return {"params_counted": int(n), "frozen_params_counted": int(n_frozen),
          "flops_per_token": int(matmuls + attention),
          "flops_per_token_causal": int(matmuls + attention // 2)}


