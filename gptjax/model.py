"""A decoder-only Transformer (GPT) in Flax linen.

Dimension letters used in names:
  B batch, L length, D d_model, H heads, K head dim, F MLP hidden, V vocabulary,
  R rows (B and L merged), C query rows of an attention chunk, S key/value columns,
  and for decoding: N layers.

Every matmul with a weight sees its activations as 2D rows [R, ...] (`rows`): the weight
gradient then contracts one dimension, a plain GEMM with one operand transposed, which the
CPU GEMM libraries read in place. With B and L apart it contracts two, and XLA:CPU first
materialises a transposed copy of the activation gradient (timed alone, the MLP's backward
ran 35% faster with rows). The reshape is free on every backend.

Attention (`model.attention`; "auto" picks per backend) is one function computed three ways:
"xla", jax.nn.dot_product_attention's XLA path; "cudnn", its fused cuDNN kernel
(FlashAttention, Dao et al. 2022) for bf16/fp16 on NVIDIA GPUs; "chunked"
(`chunked_attention`), which skips the blocks that causality masks, the fastest on the CPU.
tests/test_golden.py checks that they agree.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `position`,
`norm`, and `layers` when scanned) and the main activations are constrained with
`act_*` names; `config.mesh.rules` maps both to mesh axes, so this file never names a
physical mesh axis.

Decoding passes a `KVCache` to `Transformer.__call__`: each layer writes the new tokens'
keys and values into its cache, the tokens attend over it, and the call returns the updated
cache. Cached calls run unscanned layers (see `unstack_layers`); the training forward pass
(no cache) is untouched by this path.
"""

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.errors import UserError

ATTENTION = ("auto", "xla", "cudnn", "chunked")
DTYPES = ("float32", "bfloat16", "float16")
# Query rows per chunk of "chunked" attention. Measured at seq 256 on 2 Zen 4 cores: chunks of
# 128 and of 64 rows ran the train step alike, 256 (no chunking) 5% slower, and 32 rows made
# the batched matmuls too small.
ATTENTION_CHUNK = 128
# Logit of a key that must not be attended (jax.nn.dot_product_attention's value): its
# probability is exactly 0, so every implementation computes the same.
MASKED = -0.7 * jnp.finfo(jnp.float32).max


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyperparameters of the model (the `config.model` keys)."""
  vocab_size: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  max_len: int
  dropout: float = 0.0
  positions: str = "learned"
  rope_theta: float = 10_000.0
  norm: str = "layernorm"
  mlp: str = "gelu"
  use_bias: bool = False
  tie_embeddings: bool = True
  num_kv_heads: int = 0  # Key/value heads (grouped-query attention); 0: num_heads.
  qkv_bias: bool = False  # Biases on the q, k and v projections only (Qwen2).
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "auto"

  def __post_init__(self):
    choices = {"positions": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
               "mlp": ("gelu", "swiglu"), "remat": ("none", "full", "dots"),
               "attention": ATTENTION, "dtype": DTYPES, "param_dtype": DTYPES}
    for key, allowed in choices.items():
      if getattr(self, key) not in allowed:
        raise UserError(f"model.{key}={getattr(self, key)!r} is not one of {allowed}; "
                        f"set --config.model.{key} to one of them.")
    for key in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_len"):
      if getattr(self, key) < 1:
        raise UserError(f"model.{key}={getattr(self, key)} is not positive; set "
                        f"--config.model.{key} to a positive integer.")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"model.dropout={self.dropout} is outside [0, 1); set "
                      "--config.model.dropout to a rate in [0, 1).")
    if self.rope_theta <= 0:
      raise UserError(f"model.rope_theta={self.rope_theta} is not positive; set "
                      "--config.model.rope_theta to a positive base.")
    if self.d_model % self.num_heads:
      raise UserError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                      f"{self.num_heads}; choose heads that divide d_model.")
    if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
      raise UserError(f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads="
                      f"{self.num_heads}; set it to a divisor of num_heads (0: num_heads).")
    if self.norm_eps <= 0:
      raise UserError(f"model.norm_eps={self.norm_eps} is not positive; set "
                      "--config.model.norm_eps to a small positive number.")
    if self.positions == "rope" and self.head_dim % 2:
      raise UserError(f"RoPE needs an even head dim, got d_model/num_heads={self.head_dim}; "
                      "change model.d_model or model.num_heads.")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_kv_heads, or num_heads when it is 0."""
    return self.num_kv_heads or self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _init(cfg: ModelConfig, residual: bool = False):
  # GPT-2: N(0, 0.02), with projections into the residual stream scaled by 1/sqrt(2 * layers).
  std = 0.02 / math.sqrt(2 * cfg.num_layers) if residual else 0.02
  return nn.initializers.normal(std)


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32 whatever the compute dtype."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    x = x_BLD.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
    x = x * _param(self, "scale", nn.initializers.ones, (cfg.d_model,), ("norm",),
                   cfg.weight_dtype)
    if cfg.norm == "layernorm" and cfg.use_bias:
      x = x + _param(self, "bias", nn.initializers.zeros, (cfg.d_model,), ("norm",),
                     cfg.weight_dtype)
    return x.astype(cfg.compute_dtype)


def rope(x_BLHK, positions_BL, theta: float):
  """Rotary position embedding, rotating channel pairs (i, i + K/2)."""
  half = x_BLHK.shape[-1] // 2
  freq_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLK = positions_BL[..., None].astype(jnp.float32) * freq_K
  sin, cos = jnp.sin(angle_BLK)[:, :, None, :], jnp.cos(angle_BLK)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def rows(x_BL_):
  """[B, L, ...] -> [R, ...] with R = B * L (free; see the module docstring)."""
  return x_BL_.reshape(-1, *x_BL_.shape[2:])


def attention_mask(segment_ids_BL):
  """[B, 1, L, L] True where query and key share a packed segment (causality added apart)."""
  return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


# Logical axes of each layer's cache [B, H, S, K].
CACHE_AXES = ("batch", "act_heads", "act_length", "kv")


def _write_cache(cache_BHSK, new_BLHK, index_B):
  """The cache with each row's new keys (or values) written at its columns index_B[b].."""
  new_BHLK = new_BLHK.swapaxes(1, 2).astype(cache_BHSK.dtype)
  write_row = lambda c_HSK, n_HLK, i: jax.lax.dynamic_update_slice(c_HSK, n_HLK, (0, i, 0))
  cache_BHSK = jax.vmap(write_row)(cache_BHSK, new_BHLK, index_B)
  return nn.with_logical_constraint(cache_BHSK, CACHE_AXES)


def cudnn_unsupported(cfg: ModelConfig, device) -> str | None:
  """Why cuDNN's fused attention cannot run `cfg` on `device`, or None if it can."""
  if device.platform != "gpu" or "NVIDIA" not in device.device_kind:
    return f"it runs on NVIDIA GPUs only, not on {device.platform} ({device.device_kind})"
  if cfg.compute_dtype not in (jnp.bfloat16, jnp.float16):
    return f"it takes bfloat16 or float16 inputs only, not model.dtype={cfg.dtype!r}"
  if cfg.head_dim % 8 or cfg.head_dim > 128:
    return f"it takes head dims that are multiples of 8 up to 128, not {cfg.head_dim}"
  return None


def attention_implementation(cfg: ModelConfig) -> str:
  """`cfg.attention`, with "auto" resolved for the default backend's devices."""
  device = jax.devices()[0]
  if cfg.attention == "cudnn" and (why := cudnn_unsupported(cfg, device)):
    # jax would fail deep inside lowering with a message that names no config key.
    raise UserError(f"model.attention='cudnn' cannot run here: {why}; use model.attention="
                    "'auto' (the fastest that runs here) or 'xla'.")
  if cfg.attention != "auto":
    return cfg.attention
  if device.platform == "cpu":
    return "chunked"
  return "xla" if cudnn_unsupported(cfg, device) else "cudnn"


def chunked_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, chunk: int = ATTENTION_CHUNK):
  """jax.nn.dot_product_attention(q, k, v, mask=segment mask, is_causal=True), by query chunk.

  Queries [s, e) attend to keys [0, e) only: the blocks above the diagonal, which causality
  masks anyway, are never computed (a quarter of the work at two chunks, nearly half at
  many). The rest is the XLA path's math: float32 logits scaled after the product, masked
  keys at MASKED, a float32 softmax.
  """
  L, K = q_BLHK.shape[1], q_BLHK.shape[-1]
  out = []
  for start in range(0, L, chunk):
    end = min(start + chunk, L)
    logits_BHCS = jnp.einsum("BCHK,BSHK->BHCS", q_BLHK[:, start:end], k_BLHK[:, :end],
                             preferred_element_type=jnp.float32) * jnp.float32(K ** -0.5)
    query_C1 = jnp.arange(start, end)[:, None]
    mask_BCS = ((segment_ids_BL[:, start:end, None] == segment_ids_BL[:, None, :end])
                & (jnp.arange(end) <= query_C1))
    logits_BHCS = jnp.where(mask_BCS[:, None], logits_BHCS, MASKED)
    probs_BHCS = jax.nn.softmax(logits_BHCS, axis=-1).astype(v_BLHK.dtype)
    out.append(jnp.einsum("BHCS,BSHK->BCHK", probs_BHCS, v_BLHK[:, :end]))
  return jnp.concatenate(out, axis=1)


def cached_attention(q_BLHK, k_BHSK, v_BHSK, start_B, index_B, *, elementwise: bool = False):
  """Attention of L new tokens, at columns index_B[b]..index_B[b]+L-1, over a cache holding them.

  A query at column c sees the columns of its row (>= start_B) up to c. The math mirrors
  jax.nn.dot_product_attention (float32 logits and softmax, a large finite negative for
  masked keys) so cached logits match the full forward pass.

  `elementwise` (one token of one row, on the CPU; see `_elementwise_decode`) computes both
  products as a multiply and a sum instead of matmuls: the same values up to float rounding.
  """
  L, S = q_BLHK.shape[1], k_BHSK.shape[2]
  query_BL1 = index_B[:, None, None] + jnp.arange(L)[:, None]
  col_S = jnp.arange(S)
  # A token always sees itself, so left-padding queries never have an empty softmax.
  mask_B1LS = (((col_S >= start_B[:, None, None]) & (col_S <= query_BL1))
               | (col_S == query_BL1))[:, None]
  if elementwise:
    q_BHL1K = q_BLHK.swapaxes(1, 2)[:, :, :, None, :].astype(jnp.float32)
    logits_BHLS = (q_BHL1K * k_BHSK[:, :, None].astype(jnp.float32)).sum(-1)
  else:
    logits_BHLS = jnp.einsum("BLHK,BHSK->BHLS", q_BLHK, k_BHSK,
                             preferred_element_type=jnp.float32)
  logits_BHLS = logits_BHLS * jnp.float32(q_BLHK.shape[-1] ** -0.5)
  logits_BHLS = jnp.where(mask_B1LS, logits_BHLS, MASKED)
  probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1).astype(v_BHSK.dtype)
  if elementwise:
    out_BHLK = (probs_BHLS[..., None].astype(jnp.float32)
                * v_BHSK[:, :, None].astype(jnp.float32)).sum(-2)
    return out_BHLK.swapaxes(1, 2).astype(v_BHSK.dtype)
  return jnp.einsum("BHLS,BHSK->BLHK", probs_BHLS, v_BHSK)


def _elementwise_decode(q_BLHK) -> bool:
  """Whether cached attention multiplies and sums instead of running matmuls: for one token
  of one row on the CPU. There XLA fuses the matmuls' cache operands with the cache write in
  a way that copies each layer's K and V caches several times a step (16 whole-cache copies
  a step for the 4-layer demo model); a multiply and a sum read the caches in place, and the
  batch-1 decode step ran 10-20% faster (0.34-0.39 against 0.42-0.46 ms, 2-core Xeon VM).
  With more rows the matmuls win (batch 8: 0.9 against 1.2-1.3 ms)."""
  B, L = q_BLHK.shape[:2]
  return B == 1 and L == 1 and jax.devices()[0].platform == "cpu"


class Attention(nn.Module):
  """Causal multi-head self-attention within packed segments, or over a KV cache."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, cache=None):
    """y_BLD, or with `cache` (k_BGSK, v_BGSK, start_B, index): (y_BLD, (k_BGSK, v_BGSK)),
    G = cfg.kv_heads."""
    cfg = self.cfg
    H, K, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    B, L = x_BLD.shape[:2]
    if cfg.kv_heads == H:
      q_BLHK, k_BLGK, v_BLGK = self._fused_qkv(x_BLD)
    else:
      q_BLHK, k_BLGK, v_BLGK = self._grouped_qkv(x_BLD)
    if cfg.positions == "rope":
      q_BLHK = rope(q_BLHK, positions_BL, cfg.rope_theta)
      k_BLGK = rope(k_BLGK, positions_BL, cfg.rope_theta)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ("batch", "act_length", "act_heads", None))
    implementation = attention_implementation(cfg)
    # Grouped-query attention: each key/value head serves H / G query heads. The cache keeps
    # the G heads (its memory is what GQA saves); attention sees them repeated.
    groups = H // cfg.kv_heads
    if cache is None:
      k_BLHK, v_BLHK = (jnp.repeat(t, groups, axis=2) if groups > 1 else t
                        for t in (k_BLGK, v_BLGK))
    if cache is None and implementation == "chunked":
      out_BLHK = chunked_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL)
    elif cache is None:
      out_BLHK = jax.nn.dot_product_attention(
          q_BLHK, k_BLHK, v_BLHK, mask=attention_mask(segment_ids_BL), is_causal=True,
          implementation=implementation)
    else:
      # Write first, then attend: the update is in place, whereas attending over the old
      # cache and writing after makes XLA keep the old version, copying the cache each step.
      k_BGSK, v_BGSK, start_B, index = cache
      k_BGSK = _write_cache(k_BGSK, k_BLGK, index)
      v_BGSK = _write_cache(v_BGSK, v_BLGK, index)
      k_BHSK, v_BHSK = (jnp.repeat(t, groups, axis=1) if groups > 1 else t
                        for t in (k_BGSK, v_BGSK))
      out_BLHK = cached_attention(q_BLHK, k_BHSK, v_BHSK, start_B, index,
                                  elementwise=_elementwise_decode(q_BLHK))
    w_out = _param(self, "out", _init(cfg, residual=True), (H, K, D), ("heads", "kv", "embed"),
                   cfg.weight_dtype)
    y_RD = jnp.einsum("RHK,HKD->RD", rows(out_BLHK), w_out.astype(cfg.compute_dtype))
    y_BLD = y_RD.reshape(B, L, D)
    if cfg.use_bias:
      y_BLD = y_BLD + _param(self, "out_bias", nn.initializers.zeros, (D,), ("embed",),
                             cfg.weight_dtype).astype(cfg.compute_dtype)
    y_BLD = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y_BLD)
    return y_BLD if cache is None else (y_BLD, (k_BGSK, v_BGSK))

  def _fused_qkv(self, x_BLD):
    """q, k, v from one fused projection: a single larger matmul runs faster than three."""
    cfg = self.cfg
    H, K, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    B, L = x_BLD.shape[:2]
    w_qkv = _param(self, "qkv", _init(cfg), (D, 3, H, K), ("embed", None, "heads", "kv"),
                   cfg.weight_dtype)
    qkv_R3HK = jnp.einsum("RD,DTHK->RTHK", rows(x_BLD), w_qkv.astype(cfg.compute_dtype))
    qkv_BL3HK = qkv_R3HK.reshape(B, L, 3, H, K)
    if cfg.use_bias or cfg.qkv_bias:
      b = _param(self, "qkv_bias", nn.initializers.zeros, (3, H, K), (None, "heads", "kv"),
                 cfg.weight_dtype)
      qkv_BL3HK = qkv_BL3HK + b.astype(cfg.compute_dtype)
    return tuple(qkv_BL3HK[:, :, i] for i in range(3))

  def _grouped_qkv(self, x_BLD):
    """q [B, L, H, K] and k, v [B, L, G, K] for G < H key/value heads (two projections)."""
    cfg = self.cfg
    H, G, K, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
    B, L = x_BLD.shape[:2]
    x_RD = rows(x_BLD)
    w_q = _param(self, "q", _init(cfg), (D, H, K), ("embed", "heads", "kv"), cfg.weight_dtype)
    w_kv = _param(self, "kv", _init(cfg), (D, 2, G, K), ("embed", None, "heads", "kv"),
                  cfg.weight_dtype)
    q_BLHK = jnp.einsum("RD,DHK->RHK", x_RD, w_q.astype(cfg.compute_dtype)).reshape(B, L, H, K)
    kv_BL2GK = jnp.einsum("RD,DTGK->RTGK", x_RD, w_kv.astype(cfg.compute_dtype)).reshape(
        B, L, 2, G, K)
    if cfg.use_bias or cfg.qkv_bias:
      q_BLHK = q_BLHK + _param(self, "q_bias", nn.initializers.zeros, (H, K), ("heads", "kv"),
                               cfg.weight_dtype).astype(cfg.compute_dtype)
      kv_BL2GK = kv_BL2GK + _param(self, "kv_bias", nn.initializers.zeros, (2, G, K),
                                   (None, "heads", "kv"), cfg.weight_dtype).astype(
                                       cfg.compute_dtype)
    return q_BLHK, kv_BL2GK[:, :, 0], kv_BL2GK[:, :, 1]


class Mlp(nn.Module):
  """GELU or SwiGLU feed-forward."""
  cfg: ModelConfig
  deterministic: bool = True

  def _dense(self, name, x, shape, axes, residual=False):
    cfg = self.cfg
    w = _param(self, name, _init(cfg, residual), shape, axes, cfg.weight_dtype)
    y = (rows(x) @ w.astype(cfg.compute_dtype)).reshape(*x.shape[:2], shape[-1])
    if cfg.use_bias:
      y = y + _param(self, name + "_bias", nn.initializers.zeros, shape[-1:], axes[-1:],
                     cfg.weight_dtype).astype(cfg.compute_dtype)
    return y

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    D, F = cfg.d_model, cfg.d_ff
    if cfg.mlp == "swiglu":
      h_BLF = (nn.silu(self._dense("wi_gate", x_BLD, (D, F), ("embed", "mlp")))
               * self._dense("wi_up", x_BLD, (D, F), ("embed", "mlp")))
    else:
      h_BLF = nn.gelu(self._dense("wi", x_BLD, (D, F), ("embed", "mlp")))
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "act_length", "act_mlp"))
    y_BLD = self._dense("wo", h_BLF, (F, D), ("mlp", "embed"), residual=True)
    return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y_BLD)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, cache=None):
    """(x, None), or with `cache` (k_BHSK, v_BHSK, start_B, index): (x, (k_BHSK, v_BHSK))."""
    attn = Attention(self.cfg, self.deterministic, name="attn")(
        Norm(self.cfg, name="norm_attn")(x_BLD), segment_ids_BL, positions_BL, cache)
    y_BLD, kv = (attn, None) if cache is None else attn
    x_BLD = x_BLD + y_BLD
    x_BLD = x_BLD + Mlp(self.cfg, self.deterministic, name="mlp")(
        Norm(self.cfg, name="norm_mlp")(x_BLD))
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "act_length", "act_embed"))
    return x_BLD, kv  # (carry, output) so the same block serves nn.scan.


@flax.struct.dataclass
class KVCache:
  """Each layer's keys and values for decoding, rows left-padded.

  Row b holds its tokens in columns start_B[b] .. index_B[b] - 1; the next call writes its L
  tokens at columns index_B[b] .. index_B[b] + L - 1, and the caller keeps index_B + L <= S.
  Rows advance together in `generate` (one shared column) and apart in the serving engine
  (each decode slot at its own length). One array a layer (not one stacked array) lets XLA
  update each in place; heads before columns let both attention matmuls read it without a
  transpose.
  """
  k_BHSK: tuple[jax.Array, ...]
  v_BHSK: tuple[jax.Array, ...]
  start_B: jax.Array  # int32: first column of each row's tokens (left padding before it).
  index_B: jax.Array  # int32: each row's next column to write.


def init_cache(cfg: ModelConfig, start_B, capacity: int) -> KVCache:
  """An empty cache of `capacity` columns for rows whose tokens begin at `start_B`."""
  shape = (start_B.shape[0], cfg.kv_heads, capacity, cfg.head_dim)

  def zeros():
    return tuple(nn.with_logical_constraint(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES)
                 for _ in range(cfg.num_layers))

  return KVCache(zeros(), zeros(), start_B.astype(jnp.int32),
                 jnp.zeros(start_B.shape, jnp.int32))


def unstack_layers(params):
  """Parameters of a scan_layers model in the unscanned layout (`blocks` -> `block_{i}`)."""
  params = dict(params)
  blocks = params.pop("blocks")
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  for i in range(num_layers):
    params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return params


def untie_head(params):
  """Parameters of a tied-embedding model, plus its output head as a leaf of its own: a
  transposed copy of the embedding, [D, V], for the same model built with
  tie_embeddings=False (see generate.Generator)."""
  return {**params, "head": jnp.transpose(params["embedding"])}


def _block_class(cfg: ModelConfig):
  if cfg.remat == "none":
    return Block
  # "dots" keeps matmul outputs and recomputes the cheap elementwise ops (less memory than
  # none, less recompute than full).
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            if cfg.remat == "dots" else None)
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """tokens [B, L] -> logits [B, L, V] (float32); with a cache, -> (logits, updated cache)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None,
               deterministic: bool = True, cache: KVCache | None = None,
               embed_delta_BLD=None, return_hidden: bool = False):
    """`embed_delta_BLD` is added to the input embeddings (adversarial training);
    `return_hidden` returns the final-norm hidden states [B, L, D] instead of logits."""
    cfg = self.cfg
    B, L = tokens_BL.shape
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((B, L), jnp.int32)
    if positions_BL is None and cache is not None:
      # Left padding gets position 0; the clip keeps finished rows, which still advance,
      # inside the learned table (their outputs are discarded).
      positions_BL = jnp.clip(cache.index_B[:, None] + jnp.arange(L) - cache.start_B[:, None], 0,
                              cfg.max_len - 1)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    embedding_VD = _param(self, "embedding", _init(cfg), (cfg.vocab_size, cfg.d_model),
                          ("vocab", "embed"), cfg.weight_dtype)
    x_BLD = embedding_VD.astype(cfg.compute_dtype)[tokens_BL]
    if cfg.positions == "learned":
      pos_LD = _param(self, "pos_embedding", _init(cfg), (cfg.max_len, cfg.d_model),
                      ("position", "embed"), cfg.weight_dtype)
      x_BLD = x_BLD + pos_LD.astype(cfg.compute_dtype)[positions_BL]
    if embed_delta_BLD is not None:
      x_BLD = x_BLD + embed_delta_BLD.astype(cfg.compute_dtype)
    x_BLD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "act_length", "act_embed"))

    block = _block_class(cfg)
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError("KV-cache decoding runs unscanned layers; decode with scan_layers="
                         "False and parameters converted by model.unstack_layers.")
      blocks = nn.scan(block, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BLD, _ = blocks(cfg, deterministic, name="blocks")(x_BLD, segment_ids_BL, positions_BL)
    else:
      ks, vs = [], []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else (cache.k_BHSK[i], cache.v_BHSK[i],
                                                  cache.start_B, cache.index_B)
        x_BLD, kv = block(cfg, deterministic, name=f"block_{i}")(
            x_BLD, segment_ids_BL, positions_BL, layer_cache)
        if cache is not None:
          ks.append(kv[0])
          vs.append(kv[1])

    x_BLD = Norm(cfg, name="norm_final")(x_BLD)
    if return_hidden and cache is None:
      return x_BLD.astype(jnp.float32)
    if cfg.tie_embeddings:
      head_DV = embedding_VD.T
    else:
      head_DV = _param(self, "head", _init(cfg), (cfg.d_model, cfg.vocab_size),
                       ("embed", "vocab"), cfg.weight_dtype)
    logits_BLV = (rows(x_BLD) @ head_DV.astype(cfg.compute_dtype)).reshape(B, L, -1)
    logits_BLV = nn.with_logical_constraint(logits_BLV, ("batch", "act_length", "act_vocab"))
    if cache is None:
      return logits_BLV.astype(jnp.float32)
    return logits_BLV.astype(jnp.float32), cache.replace(
        k_BHSK=tuple(ks), v_BHSK=tuple(vs), index_B=cache.index_B + L)
