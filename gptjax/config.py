"""The base config: every key, its default and what it means.

Config flows one way: an experiment file overrides a few keys of `base_config()`, the command
line overrides more (`--config.train.steps=200`), and the library receives plain arguments or
the small frozen dataclasses below, never the ConfigDict itself.
"""

import json

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every key; experiments override a few."""
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"  # Name of this training stage; recorded in every metrics row.
  c.init_from = ""  # Workdir of an earlier stage whose parameters start this one ("" = none).
  c.init_from_step = "latest"  # Its checkpoint: "latest", "best" or a step number.

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 1024  # Tokenizer vocabulary; the tokenizer is trained to exactly this size.
  m.num_layers = 4  # Transformer blocks.
  m.num_heads = 4  # Attention heads; must divide d_model.
  m.d_model = 128  # Residual stream width.
  m.d_ff = 512  # MLP hidden width (for SwiGLU, the width of each of its two input branches).
  m.max_len = 256  # Longest sequence the model accepts; data.seq_len must not exceed it.
  m.dropout = 0.0  # Dropout rate on attention output, MLP output and embeddings.
  m.positions = "learned"  # "learned" absolute embeddings or "rope" (rotary, Su et al. 2021).
  m.rope_theta = 10_000.0  # RoPE base frequency; ignored for learned positions.
  m.norm = "layernorm"  # "layernorm" or "rmsnorm"; pre-norm blocks plus a final norm.
  m.mlp = "gelu"  # "gelu" (GPT-2) or "swiglu" (Shazeer 2020).
  m.use_bias = False  # Biases in dense layers and LayerNorm.
  m.tie_embeddings = True  # Output head reuses the token embedding matrix.
  m.dtype = "float32"  # Compute dtype of matmuls ("bfloat16" on accelerators); loss is float32.
  m.param_dtype = "float32"  # Storage dtype of parameters and optimizer state.
  m.scan_layers = False  # nn.scan over blocks: compile time independent of depth.
  m.remat = "none"  # Rematerialise blocks in the backward pass: "none", "full" or "dots".
  # Attention kernel: "auto" (per backend: "chunked" on the CPU, "cudnn" for bf16/fp16 on
  # NVIDIA GPUs, else "xla"), or one of them by name; all compute the same (gptjax/model.py).
  m.attention = "auto"

  c.host = h = ml_collections.ConfigDict()
  # Process-level settings, applied by the command line at start (gptjax/host.py).
  h.hugepages = True  # Back XLA:CPU's per-step buffers with transparent huge pages (Linux).
  h.xla_cpu_flags = "auto"  # XLA flags: "auto" = gptjax's measured CPU defaults, "" = none.

  c.tokenizer = t = ml_collections.ConfigDict()
  t.model_type = "bpe"  # SentencePiece algorithm: "bpe" or "unigram".
  t.max_chars = 5_000_000  # Characters of training text the tokenizer trainer reads at most.

  c.data = d = ml_collections.ConfigDict()
  d.kind = "text"  # "text": documents for pretraining; "dialogue": conversations.
  # tfds dataset(s), comma-separated and mixed in proportion to size; an entry may name its
  # own splits as NAME:TRAIN_SPLIT:EVAL_SPLIT. Dialogue datasets become transcripts in "text".
  d.dataset = "tiny_shakespeare"
  d.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir; None: tfds' own (honours TFDS_DATA_DIR).
  d.train_split = "train"  # Split to train on.
  d.eval_split = "validation"  # Split to evaluate on; "" disables eval.
  d.text_field = "text"  # Feature holding the text.
  d.chunk_chars = 2_000  # Long records are cut into documents of at most this many characters.
  d.seq_len = 256  # Tokens per packed row; at most model.max_len.
  d.eval_batches = 0  # Eval batches per evaluation; 0: the whole eval split.
  d.train_files = ""  # dialogue: comma-separated JSONL chat files used instead of `dataset`.
  d.eval_files = ""  # dialogue: JSONL chat files to evaluate on (with train_files).
  d.strict = False  # dialogue: stop at the first bad record instead of skipping it.

  c.dialogue = dl = ml_collections.ConfigDict()
  # Weight of every non-assistant token (system, user, template) against reply tokens (1):
  # 1.0 is dialogue regression (the whole dialogue is the target); 0.0 trains on replies only.
  dl.history_weight = 1.0
  # A conversation longer than data.seq_len: "recent" keeps its most recent turns that fit;
  # "windows" splits it into several renderings, each ending at a reply, so every reply trains.
  dl.long_conversations = "recent"

  c.train = tr = ml_collections.ConfigDict()
  tr.steps = 1_000  # Optimizer steps.
  tr.batch_size = 16  # Global batch in rows; divisible by the data-parallel size (mesh data * fsdp).
  tr.grad_accum_steps = 1  # Micro-batches per step; must divide batch_size / data-parallel size.
  tr.learning_rate = 1e-3  # Peak learning rate.
  tr.min_lr_ratio = 0.1  # Cosine decays to learning_rate * min_lr_ratio at the last step.
  tr.warmup_steps = 100  # Linear warm-up steps from 0.
  tr.weight_decay = 0.1  # AdamW decoupled weight decay; never applied to norms or biases.
  tr.b1 = 0.9  # Adam beta1.
  tr.b2 = 0.95  # Adam beta2.
  tr.eps = 1e-8  # Adam epsilon.
  tr.grad_clip = 1.0  # Global-norm gradient clipping; 0 disables.
  tr.seed = 0  # Seeds parameter init, data order and dropout.
  tr.log_every = 10  # Steps between train rows in metrics.jsonl (metrics are averaged over them).
  tr.eval_every = 200  # Steps between evaluations; 0 disables (a final eval still runs).
  tr.checkpoint_every = 200  # Steps between checkpoints; one is always saved at the end.
  tr.max_to_keep = 3  # Latest checkpoints kept in the workdir (plus the best by eval loss).
  tr.trainable = "all"  # "all", "no_embed" (freeze embeddings) or "top:N" (top N blocks + head).
  tr.patience = 0  # Stop after this many evals without a lower eval loss; 0 never stops.

  c.mesh = ms = ml_collections.ConfigDict()
  # Device mesh sizes; their product is the device count. -1 on one axis takes the rest.
  ms.data = -1  # Pure data parallelism (replicated parameters).
  ms.fsdp = 1  # Data parallelism with parameters and optimizer state sharded (ZeRO-3).
  ms.tensor = 1  # Tensor parallelism over heads, MLP hidden and vocabulary (Megatron).
  # Logical axis -> mesh axes. Parameters and activations name logical axes only; this table
  # is the one place that decides how they are laid out on the mesh.
  ms.rules = (
      ("batch", ("data", "fsdp")),
      ("act_length", None),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("position", None),
      ("layers", None),
      ("norm", None),
  )
  return c


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as stable JSON (written to DIR/config.json)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of to_json; lists come back as tuples so rules stay hashable."""

  def tuples(x):
    if isinstance(x, list):
      return tuple(tuples(v) for v in x)
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return x

  return ml_collections.ConfigDict(tuples(json.loads(text)))


# Keys whose change makes a checkpoint unusable: a workdir refuses a config that differs here.
MODEL_SHAPE_KEYS = (
    "vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_len", "positions",
    "norm", "mlp", "use_bias", "tie_embeddings", "param_dtype", "scan_layers",
)


def model_shape_diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """Human-readable differences between two configs on the keys that fix parameter shapes."""
  diffs = []
  for key in MODEL_SHAPE_KEYS:
    a, b = old.model.get(key), new.model.get(key)
    if a != b:
      diffs.append(f"model.{key}: {a!r} -> {b!r}")
  return diffs
