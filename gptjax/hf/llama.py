"""The Llama family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): RoPE in
Hugging Face's rotate-half layout (gptjax's own: channel i pairs with i + K/2), RMSNorm,
SwiGLU, grouped-query attention, a tied or untied head; Qwen2 adds q/k/v biases.

torch Linear weights are [out, in]; gptjax keeps [in, out] split into heads. With as many
key/value heads as query heads q, k and v join into gptjax's fused `qkv`, else into `q` and
`kv`. Export takes every gptjax config with RoPE, RMSNorm, SwiGLU and no dense biases.
"""

import numpy as np

from gptjax.errors import UserError
from gptjax.hf.table import Row, same, transposed

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
IGNORED = (".rotary_emb.inv_freq",)


def _rope_theta(c: dict) -> float:
  # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
  params = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or params
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind != "default":
    raise UserError(f"RoPE scaling {kind!r} is not supported; expected plain RoPE "
                    "(rope_type default); pick a checkpoint without rope_scaling.")
  return float(c.get("rope_theta") or params.get("rope_theta") or 10_000.0)


def model_config(c: dict) -> dict:
  """gptjax `model` keys of a Llama-family config.json; refuses what gptjax does not compute."""
  arch = c["architectures"][0]
  if c.get("hidden_act", "silu") != "silu":
    raise UserError(f"hidden_act={c['hidden_act']!r} is not supported; expected silu (SwiGLU).")
  if arch != "Qwen2ForCausalLM" and (c.get("attention_bias") or c.get("mlp_bias")):
    raise UserError("attention_bias / mlp_bias are not supported for this architecture; "
                    "expected a checkpoint without dense biases.")
  d, heads = c["hidden_size"], c["num_attention_heads"]
  if c.get("head_dim") not in (None, d // heads):
    raise UserError(f"head_dim={c['head_dim']} differs from hidden_size/num_attention_heads="
                    f"{d // heads}; gptjax derives the head dim from them.")
  max_len = c.get("max_position_embeddings", 2048)
  if c.get("sliding_window") and c.get("use_sliding_window", True):
    # Within the window, sliding-window attention is full causal attention.
    max_len = min(max_len, c["sliding_window"])
  return {"num_layers": c["num_hidden_layers"], "num_heads": heads, "d_model": d,
              "d_ff": c["intermediate_size"], "max_len": max_len, "positions": "rope",
              "rope_theta": _rope_theta(c), "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False,
              "qkv_bias": arch == "Qwen2ForCausalLM",
              "num_kv_heads": c.get("num_key_value_heads") or heads,
              "tie_embeddings": c.get("tie_word_embeddings", False),
              "norm_eps": float(c.get("rms_norm_eps", 1e-6))}


def exportable(m) -> str | None:
  """Why gptjax model config `m` cannot be a Llama / Qwen2, or None."""
  if (m.positions, m.norm, m.mlp) != ("rope", "rmsnorm", "swiglu"):
    return "the Llama family needs RoPE, RMSNorm and SwiGLU"
  if m.use_bias:
    return "the Llama family has no dense or norm biases (model.use_bias)"
  return None


def hf_config(m) -> dict:
  qwen = m.qkv_bias
  return {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
          "model_type": "qwen2" if qwen else "llama", "hidden_size": m.d_model,
          "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers,
          "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
          "head_dim": m.head_dim, "max_position_embeddings": m.max_len,
          "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "vocab_size": m.vocab_size,
          "hidden_act": "silu", "tie_word_embeddings": m.tie_embeddings,
          "attention_bias": False, "mlp_bias": False, "use_cache": True}


def _heads(w, n, k):
  """torch [n * k, D] -> [D, n, k]."""
  return w.T.reshape(w.shape[1], n, k)


def _unheads(p):
  """[D, n, k] -> torch [n * k, D]."""
  return p.reshape(p.shape[0], -1).T


def rows(m, biases: bool = True) -> list[Row]:
  """The mapping for gptjax model config `m` (`biases` is GPT-2's; q/k/v biases follow
  m.qkv_bias)."""
  del biases
  H, G, K = m.num_heads, m.kv_heads, m.head_dim
  out = [same(("embedding",), "model.embed_tokens.weight", vocab_axis=0)]
  for i in range(m.num_layers):
    b, h = f"block_{i}", f"model.layers.{i}."
    q, k, v = (h + f"self_attn.{n}_proj" for n in "qkv")
    if G == H:
      out.append(Row((b, "attn", "qkv"), (q + ".weight", k + ".weight", v + ".weight"),
                     lambda *w: np.stack([_heads(x, H, K) for x in w], axis=1),
                     lambda p: tuple(_unheads(p[:, j]) for j in range(3))))
      if m.qkv_bias:
        out.append(Row((b, "attn", "qkv_bias"), (q + ".bias", k + ".bias", v + ".bias"),
                       lambda *x: np.stack([y.reshape(H, K) for y in x]),
                       lambda p: tuple(p[j].reshape(-1) for j in range(3))))
    else:
      out += [Row((b, "attn", "q"), (q + ".weight",), lambda w: _heads(w, H, K),
                  lambda p: (_unheads(p),)),
              Row((b, "attn", "kv"), (k + ".weight", v + ".weight"),
                  lambda *w: np.stack([_heads(x, G, K) for x in w], axis=1),
                  lambda p: tuple(_unheads(p[:, j]) for j in range(2)))]
      if m.qkv_bias:
        out += [Row((b, "attn", "q_bias"), (q + ".bias",), lambda x: x.reshape(H, K),
                    lambda p: (p.reshape(-1),)),
                Row((b, "attn", "kv_bias"), (k + ".bias", v + ".bias"),
                    lambda *x: np.stack([y.reshape(G, K) for y in x]),
                    lambda p: tuple(p[j].reshape(-1) for j in range(2)))]
    out += [Row((b, "attn", "out"), (h + "self_attn.o_proj.weight",),
                lambda w: w.T.reshape(H, K, w.shape[0]), lambda p: (p.reshape(H * K, -1).T,)),
            same((b, "norm_attn", "scale"), h + "input_layernorm.weight"),
            same((b, "norm_mlp", "scale"), h + "post_attention_layernorm.weight"),
            transposed((b, "mlp", "wi_gate"), h + "mlp.gate_proj.weight"),
            transposed((b, "mlp", "wi_up"), h + "mlp.up_proj.weight"),
            transposed((b, "mlp", "wo"), h + "mlp.down_proj.weight")]
  out.append(same(("norm_final", "scale"), "model.norm.weight"))
  if not m.tie_embeddings:
    out.append(transposed(("head",), "lm_head.weight", vocab_axis=1))
  return out


def hf_name(name: str) -> str:
  return name
