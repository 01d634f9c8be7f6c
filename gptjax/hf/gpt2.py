"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm with biases, tanh GELU, Conv1D
weights stored [in, out] (gptjax's own layout), a tied head (or `lm_head` when untied).

Export takes every gptjax config with learned positions, LayerNorm and GELU and no GQA;
a config without biases exports them as zeros, which computes the same.
"""

from gptjax.errors import UserError
from gptjax.hf.table import Row, same

ARCHITECTURES = ("GPT2LMHeadModel",)
# Buffers older checkpoints carry (the causal mask), not parameters.
IGNORED = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."


def model_config(c: dict) -> dict:
  """gptjax `model` keys of a GPT-2 config.json; refuses what gptjax does not compute."""
  act = c.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise UserError(f"GPT-2 activation_function={act!r} is not supported; expected gelu_new "
                    "(tanh GELU), which gptjax computes.")
  if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
    raise UserError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported; "
                    "expected scale_attn_weights=true and scale_attn_by_inverse_layer_idx="
                    "false.")
  d = c["n_embd"]
  return {"num_layers": c["n_layer"], "num_heads": c["n_head"], "d_model": d,
              "d_ff": c.get("n_inner") or 4 * d, "max_len": c["n_positions"], "positions": "learned",
              "norm": "layernorm", "mlp": "gelu", "use_bias": True,
              "tie_embeddings": c.get("tie_word_embeddings", True),
              "norm_eps": float(c.get("layer_norm_epsilon", 1e-5))}


def exportable(m) -> str | None:
  """Why gptjax model config `m` cannot be a GPT-2, or None."""
  if (m.positions, m.norm, m.mlp) != ("learned", "layernorm", "gelu"):
    return "GPT-2 needs learned positions, LayerNorm and GELU"
  if m.kv_heads != m.num_heads:
    return "GPT-2 has no grouped-query attention"
  return None


def hf_config(m) -> dict:
  return {"architectures": list(ARCHITECTURES), "model_type": "gpt2", "n_embd": m.d_model,
          "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.d_ff,
          "n_positions": m.max_len, "n_ctx": m.max_len, "vocab_size": m.vocab_size,
          "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
          "tie_word_embeddings": m.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
          "attn_pdrop": 0.0, "scale_attn_weights": True, "use_cache": True}


def rows(m, biases: bool = True) -> list[Row]:
  """The mapping for gptjax model config `m`; `biases` False leaves out the bias rows (a
  model without biases imports none and exports zeros in their place)."""
  H, K, D = m.num_heads, m.head_dim, m.d_model
  out = [same(("embedding",), "wte.weight", vocab_axis=0),
         same(("pos_embedding",), "wpe.weight")]
  for i in range(m.num_layers):
    b, h = f"block_{i}", f"h.{i}."
    out += [same((b, "norm_attn", "scale"), h + "ln_1.weight"),
            Row((b, "attn", "qkv"), (h + "attn.c_attn.weight",),
                lambda x: x.reshape(D, 3, H, K), lambda p: (p.reshape(D, 3 * H * K),)),
            Row((b, "attn", "out"), (h + "attn.c_proj.weight",),
                lambda x: x.reshape(H, K, D), lambda p: (p.reshape(H * K, D),)),
            same((b, "norm_mlp", "scale"), h + "ln_2.weight"),
            same((b, "mlp", "wi"), h + "mlp.c_fc.weight"),
            same((b, "mlp", "wo"), h + "mlp.c_proj.weight")]
    if biases:
      out += [same((b, "norm_attn", "bias"), h + "ln_1.bias"),
              Row((b, "attn", "qkv_bias"), (h + "attn.c_attn.bias",),
                  lambda x: x.reshape(3, H, K), lambda p: (p.reshape(3 * H * K),)),
              same((b, "attn", "out_bias"), h + "attn.c_proj.bias"),
              same((b, "norm_mlp", "bias"), h + "ln_2.bias"),
              same((b, "mlp", "wi_bias"), h + "mlp.c_fc.bias"),
              same((b, "mlp", "wo_bias"), h + "mlp.c_proj.bias")]
  out.append(same(("norm_final", "scale"), "ln_f.weight"))
  if biases:
    out.append(same(("norm_final", "bias"), "ln_f.bias"))
  out = [Row(r.path, tuple(PREFIX + n for n in r.hf), r.join, r.split, r.vocab_axis)
         for r in out]
  if not m.tie_embeddings:
    out.append(Row(("head",), ("lm_head.weight",), lambda x: x.T, lambda p: (p.T,), 1))
  return out


def hf_name(name: str) -> str:
  """A checkpoint's tensor name as this table spells it (hub GPT-2 files lack the prefix)."""
  return name if name.startswith((PREFIX, "lm_head")) else PREFIX + name
