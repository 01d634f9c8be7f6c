"""The base config: every key, its default and what it means; and its typed, frozen form.

Config flows one way: an experiment file overrides a few keys of `base_config()`, the command
line overrides more (`--config.train.steps=200`), and `stage_config` turns the result once
into a frozen `StageConfig` (one dataclass a group: model, tokenizer, data, dialogue, train,
mesh, host), checking every value. The library receives a StageConfig (or one of its groups,
or plain arguments), never the ConfigDict, and never changes it. `base_config()` is the one
place defaults live: a StageConfig is always built on top of it, so a config.json written
before a key existed still reads.
"""

import dataclasses
import json
import os
import runpy
import typing
from collections.abc import Mapping

import ml_collections

from gptjax import host as host_lib
from gptjax.errors import UserError
from gptjax.model import ModelConfig


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
  m.num_kv_heads = 0  # Key/value heads, dividing num_heads (grouped-query attention); 0: num_heads.
  m.qkv_bias = False  # Biases on the q, k and v projections only (Qwen2); use_bias adds all.
  m.norm_eps = 1e-5  # Epsilon inside LayerNorm / RMSNorm (imported models bring their own).
  m.dtype = "float32"  # Compute dtype of matmuls ("bfloat16" on accelerators); loss is float32.
  m.param_dtype = "float32"  # Storage dtype of parameters and optimizer state.
  m.scan_layers = False  # nn.scan over blocks: compile time independent of depth.
  m.remat = "none"  # Rematerialise blocks in the backward pass: "none", "full" or "dots".
  # Attention kernel: "auto" (per backend: "chunked" on the CPU, "cudnn" for bf16/fp16 on
  # NVIDIA GPUs, else "xla"), or one of them by name; all compute the same (gptjax/model.py).
  m.attention = "auto"
  m.lora = lr = ml_collections.ConfigDict()
  # LoRA adapters (Hu et al. 2021; gptjax/lora.py): the base weights of `init_from` stay frozen
  # and only low-rank adapters on the target kernels train.
  lr.rank = 0  # Adapter rank r; 0 turns LoRA off.
  lr.alpha = 16.0  # Adapters are scaled by alpha / rank.
  lr.dropout = 0.0  # Dropout on the adapters' input features (one mask a step; see lora.py).
  lr.targets = "q,v"  # Comma-separated, any of q, k, v, o (attention), mlp_in, mlp_out.
  # Token rows that train beside the adapters (a delta on their embedding rows, and on their
  # output-head columns when untied): "chat" (the tokenizer's system, user, assistant and end
  # tokens, which pretraining never sees), "" (none) or comma-separated ids. A run records
  # the ids its tokenizer gives "chat" in its config.json.
  lr.train_tokens = "chat"

  c.host = h = ml_collections.ConfigDict()
  # Process-level settings, applied by the command line at start (gptjax/host.py).
  # Memory allocator: "auto" = jemalloc where installed (apt-get install libjemalloc2), which
  # reuses XLA:CPU's per-step buffers instead of zeroing fresh pages every step; "glibc".
  h.allocator = "auto"
  h.hugepages = True  # glibc: back XLA:CPU's per-step buffers with transparent huge pages.
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

  c.classify = cl = ml_collections.ConfigDict()
  # data.kind="classify" (gptjax/classify.py): a label for each text from its final hidden state.
  cl.labels = ""  # Comma-separated class names, in order (ClassLabel integers index this list).
  cl.label_field = "label"  # tfds feature holding the label (schema_guided_dialogue: "service"
  # or "domain" of the first user message).
  cl.pool = "last"  # Head input: "last" real token's hidden state, or "mean" over real tokens.

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
  # Also checkpoint at the first logging step this many minutes after the last save, so a hard
  # kill loses at most about that much work; 0 disables.
  tr.save_every_minutes = 0.0
  tr.max_to_keep = 3  # Latest checkpoints kept in the workdir (plus the best by early_stop_metric).
  tr.trainable = "all"  # "all", "no_embed" (freeze embeddings) or "top:N" (top N blocks + head).
  tr.patience = 0  # Stop after this many evals without a better early_stop_metric; 0 never stops.
  # The eval metric that patience and the "best" checkpoint follow: "loss" or another eval
  # metric of the stage (EVAL_METRICS); accuracy and macro_f1 are better higher, the rest lower.
  tr.early_stop_metric = "loss"
  # Adversarial training: "none", or "fgm" (Miyato et al. 2017): each step also takes the loss
  # on input embeddings perturbed along the loss gradient, and trains on the mean of both.
  tr.adversarial = "none"
  tr.adversarial_epsilon = 1.0  # fgm: L2 norm of the perturbation over each row's [L, D].

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
      ("lora_rank", None),
      ("lora_tokens", None),
  )
  return c


# ----------------------------------------------------------------------------- typed groups

DATA_KINDS = ("text", "dialogue", "classify")
# The eval metrics every evaluation of a data kind reports (gptjax/evaluate.py), which
# train.early_stop_metric may name; HIGHER_IS_BETTER lists the ones that improve upwards.
EVAL_METRICS = {"text": ("loss", "perplexity"),
                "dialogue": ("loss", "perplexity", "assistant_loss"),
                "classify": ("loss", "perplexity", "accuracy", "macro_f1")}
HIGHER_IS_BETTER = ("accuracy", "macro_f1")
LONG_CONVERSATIONS = ("recent", "windows")
TOKENIZER_TYPES = ("bpe", "unigram")
ADVERSARIAL = ("none", "fgm")


def metric_sign(metric: str) -> float:
  """+1 if a lower value of eval metric `metric` is better, -1 if a higher one is."""
  return -1.0 if metric in HIGHER_IS_BETTER else 1.0


def _check(ok: bool, key: str, value, expected: str):
  """Raises a one-line UserError naming the key unless `ok`."""
  if not ok:
    raise UserError(f"{key}={value!r} is invalid: expected {expected}; set --config.{key} "
                    "(or fix the experiment file).")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """`config.tokenizer`: how a stage without a tokenizer trains one."""
  model_type: str
  max_chars: int

  def __post_init__(self):
    _check(self.model_type in TOKENIZER_TYPES, "tokenizer.model_type", self.model_type,
           f"one of {TOKENIZER_TYPES}")
    _check(self.max_chars > 0, "tokenizer.max_chars", self.max_chars, "a positive count")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`: what a stage reads and how it is packed."""
  kind: str
  dataset: str
  data_dir: str | None
  train_split: str
  eval_split: str
  text_field: str
  chunk_chars: int
  seq_len: int
  eval_batches: int
  train_files: str
  eval_files: str
  strict: bool

  def __post_init__(self):
    _check(self.kind in DATA_KINDS, "data.kind", self.kind, f"one of {DATA_KINDS}")
    _check(self.chunk_chars > 0, "data.chunk_chars", self.chunk_chars, "a positive count")
    _check(self.seq_len > 0, "data.seq_len", self.seq_len, "a positive length")
    _check(self.eval_batches >= 0, "data.eval_batches", self.eval_batches, "0 (all) or more")
    _check(bool(self.dataset.strip() or self.train_files.strip()), "data.dataset",
           self.dataset, "a tfds dataset name (or JSONL files in data.train_files)")


@dataclasses.dataclass(frozen=True)
class DialogueConfig:
  """`config.dialogue`: the loss weights and long-conversation handling of dialogue stages."""
  history_weight: float
  long_conversations: str

  def __post_init__(self):
    _check(0.0 <= self.history_weight <= 1.0, "dialogue.history_weight", self.history_weight,
           "a weight in [0, 1]")
    _check(self.long_conversations in LONG_CONVERSATIONS, "dialogue.long_conversations",
           self.long_conversations, f"one of {LONG_CONVERSATIONS}")


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
  """`config.classify`: the labels and head of a classification stage (data.kind="classify")."""
  labels: str
  label_field: str
  pool: str

  def __post_init__(self):
    _check(self.pool in ("last", "mean"), "classify.pool", self.pool, "'last' or 'mean'")
    names = self.label_names
    _check(len(set(names)) == len(names), "classify.labels", self.labels,
           "distinct comma-separated class names")

  @property
  def label_names(self) -> tuple[str, ...]:
    return tuple(n.strip() for n in self.labels.split(",") if n.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`config.train`: the optimizer, its schedule and the loop's cadence."""
  steps: int
  batch_size: int
  grad_accum_steps: int
  learning_rate: float
  min_lr_ratio: float
  warmup_steps: int
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float
  seed: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  save_every_minutes: float
  max_to_keep: int
  trainable: str
  patience: int
  adversarial: str
  adversarial_epsilon: float
  early_stop_metric: str

  def __post_init__(self):
    for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
                "max_to_keep"):
      _check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
    _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate,
           "a positive learning rate")
    for key in ("warmup_steps", "eval_every", "patience", "weight_decay", "grad_clip",
                "save_every_minutes"):
      _check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "0 or more")
    _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio,
           "a ratio in [0, 1]")
    for key in ("b1", "b2"):
      _check(0.0 <= getattr(self, key) < 1.0, f"train.{key}", getattr(self, key),
             "a decay rate in [0, 1)")
    _check(self.eps > 0, "train.eps", self.eps, "a positive epsilon")
    _check(self.adversarial in ADVERSARIAL, "train.adversarial", self.adversarial,
           f"one of {ADVERSARIAL}")
    _check(self.adversarial_epsilon >= 0, "train.adversarial_epsilon",
           self.adversarial_epsilon, "0 or more")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`config.model.lora`: low-rank adapters on frozen base weights (gptjax/lora.py)."""
  rank: int
  alpha: float
  dropout: float
  targets: str
  train_tokens: str

  def __post_init__(self):
    from gptjax import lora as lora_lib  # pylint: disable=import-outside-toplevel  (imports config)
    _check(self.rank >= 0, "model.lora.rank", self.rank, "0 (off) or a positive rank")
    _check(self.alpha > 0, "model.lora.alpha", self.alpha, "a positive scale")
    _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "a rate in [0, 1)")
    names = self.target_names
    _check(bool(names) and all(n in lora_lib.TARGETS for n in names), "model.lora.targets",
           self.targets, f"comma-separated names from {tuple(lora_lib.TARGETS)}")
    ids = [t.strip() for t in self.train_tokens.split(",") if t.strip()]
    _check(self.train_tokens == lora_lib.CHAT_TOKENS
           or (all(i.isdigit() for i in ids) and len(set(ids)) == len(ids)),
           "model.lora.train_tokens", self.train_tokens,
           f"{lora_lib.CHAT_TOKENS!r}, '' (none) or distinct comma-separated token ids")

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.targets.split(",") if t.strip())

  @property
  def token_ids(self) -> tuple[int, ...]:
    """The ids of the token rows that train (see gptjax/lora.py `token_ids`)."""
    from gptjax import lora as lora_lib  # pylint: disable=import-outside-toplevel  (imports config)
    return lora_lib.token_ids(self.train_tokens)

  def pinned(self, tokenizer) -> "LoraConfig":
    """A LoRA config with train_tokens as `tokenizer`'s ids: what a run records."""
    if not self.rank:
      return self
    from gptjax import lora as lora_lib  # pylint: disable=import-outside-toplevel  (imports config)
    ids = lora_lib.token_ids(self.train_tokens, tokenizer)
    return dataclasses.replace(self, train_tokens=",".join(map(str, ids)))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh`: device mesh sizes and the logical-axis -> mesh-axes rules table."""
  data: int
  fsdp: int
  tensor: int
  rules: tuple[tuple[str, typing.Any], ...]

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(
        (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
        for name, axes in self.rules))
    for key in ("data", "fsdp", "tensor"):
      size = getattr(self, key)
      _check(size > 0 or size == -1, f"mesh.{key}", size, "a positive size or -1 (the rest)")

  @property
  def sizes(self) -> dict[str, int]:
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class HostConfig:
  """`config.host`: process settings applied at start (gptjax/host.py)."""
  hugepages: bool
  xla_cpu_flags: str
  allocator: str = "auto"  # Absent from workdirs written before it existed.

  def __post_init__(self):
    _check(self.allocator in host_lib.ALLOCATORS, "host.allocator", self.allocator,
           "'auto' (jemalloc where installed), 'jemalloc' or 'glibc'")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage, every key checked: what the library receives instead of a ConfigDict.

  `init_from` is as the user gave it until `workdir.resolve` pins it to an absolute path and
  `init_from_step` to a step number.
  """
  stage: str
  init_from: str
  init_from_step: str
  model: ModelConfig
  tokenizer: TokenizerConfig
  data: DataConfig
  dialogue: DialogueConfig
  classify: ClassifyConfig
  train: TrainConfig
  mesh: MeshConfig
  host: HostConfig
  lora: LoraConfig  # The `model.lora` keys (a group apart: ModelConfig is the modules' own).

  def __post_init__(self):
    if self.data.seq_len > self.model.max_len:
      raise UserError(f"data.seq_len={self.data.seq_len} is above model.max_len="
                      f"{self.model.max_len}; lower --config.data.seq_len or raise "
                      "--config.model.max_len.")
    step = self.init_from_step
    _check(step in ("latest", "best") or step.isdigit(), "init_from_step", step,
           "'latest', 'best' or a step number")
    _check(_trainable_ok(self.train.trainable, self.model.num_layers), "train.trainable",
           self.train.trainable, f"'all', 'no_embed' or 'top:N' with N <= "
           f"{self.model.num_layers} layers")
    metrics = EVAL_METRICS[self.data.kind]
    _check(self.train.early_stop_metric in metrics, "train.early_stop_metric",
           self.train.early_stop_metric, f"an eval metric of a data.kind={self.data.kind!r} "
           f"stage: one of {metrics}")
    if self.data.kind == "classify":
      _check(len(self.classify.label_names) >= 2, "classify.labels", self.classify.labels,
             "at least two comma-separated class names for data.kind='classify'")
    if self.lora.rank:
      _check(bool(self.init_from), "init_from", self.init_from,
             "the workdir of a trained base model: a LoRA stage (model.lora.rank > 0) adapts one")
      _check(self.train.trainable == "all", "train.trainable", self.train.trainable,
             "'all' with LoRA (only the adapters train)")
      _check(all(i < self.model.vocab_size for i in self.lora.token_ids),
             "model.lora.train_tokens", self.lora.train_tokens,
             f"token ids below model.vocab_size={self.model.vocab_size}")

  def to_dict(self) -> dict:
    """The nested dict of every key (the shape of base_config().to_dict())."""
    out = dataclasses.asdict(self)
    out["model"]["lora"] = out.pop("lora")
    return out

  def replace(self, **groups) -> "StageConfig":
    """A copy with top-level keys replaced and groups updated: replace(train={"steps": 5})."""
    changes = {}
    for key, value in groups.items():
      current = getattr(self, key)
      if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
        value = dataclasses.replace(current, **value)
      changes[key] = value
    return dataclasses.replace(self, **changes)


def _trainable_ok(trainable: str, num_layers: int) -> bool:
  if trainable in ("all", "no_embed"):
    return True
  prefix, _, count = trainable.partition(":")
  return prefix == "top" and count.isdigit() and int(count) <= num_layers


GROUPS = {"model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig,
          "dialogue": DialogueConfig, "classify": ClassifyConfig, "train": TrainConfig, "mesh": MeshConfig,
          "host": HostConfig}


def _coerce(key: str, value, annotation):
  """`value` as the field's type (JSON and ConfigDicts hold ints for floats, lists for tuples)."""
  if annotation in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if annotation in (int, "int") and isinstance(value, float) and value.is_integer():
    return int(value)
  allowed = {int: int, float: float, str: str, bool: bool, "int": int, "float": float,
             "str": str, "bool": bool}.get(annotation)
  if allowed is not None and not (isinstance(value, allowed)
                                  and not (allowed is int and isinstance(value, bool))):
    raise UserError(f"{key}={value!r} has type {type(value).__name__}; expected "
                    f"{allowed.__name__}; set --config.{key} to a {allowed.__name__}.")
  return value


def _group(cls, name: str, values: Mapping):
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise UserError(f"{name}.{unknown[0]} is not a config key; expected one of "
                    f"{sorted(fields)}; check the spelling (gptjax/config.py lists them).")
  return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def stage_config(config: ml_collections.ConfigDict | Mapping) -> StageConfig:
  """The typed, checked form of one stage's config (a ConfigDict, or its dict from JSON).

  Keys missing from `config` take base_config()'s defaults; an unknown key or a value of the
  wrong type or out of range is a one-line UserError naming it.
  """
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  merged = base_config().to_dict()
  unknown = sorted(set(values) - set(merged))
  if unknown:
    raise UserError(f"{unknown[0]!r} is not a config key; expected the keys of a stage config "
                    f"({', '.join(sorted(merged))}); a pipeline config goes to "
                    "`python -m gptjax pipeline`.")
  for key, value in values.items():
    if isinstance(merged[key], dict):
      if not isinstance(value, Mapping):
        raise UserError(f"{key}={value!r} is not a group of keys; expected a dict.")
      merged[key] = {**merged[key], **value}
    else:
      merged[key] = value
  top = {k: _coerce(k, merged[k], str) for k in ("stage", "init_from", "init_from_step")}
  lora_values = base_config().model.lora.to_dict()
  model_values = dict(merged["model"])
  given_lora = model_values.pop("lora", {})
  if not isinstance(given_lora, Mapping):
    raise UserError(f"model.lora={given_lora!r} is not a group of keys; expected a dict.")
  merged["model"] = model_values
  groups = {name: _group(cls, name, merged[name]) for name, cls in GROUPS.items()}
  groups["lora"] = _group(LoraConfig, "model.lora", {**lora_values, **given_lora})
  return StageConfig(**top, **groups)


def to_json(config: StageConfig) -> str:
  """The config as stable JSON (written to DIR/config.json)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> StageConfig:
  """Inverse of to_json."""
  values = json.loads(text)
  lora = values.get("model", {}).get("lora")
  if isinstance(lora, dict):  # Written before model.lora.train_tokens: no token rows.
    lora.setdefault("train_tokens", "")
  return stage_config(values)


# Keys whose change makes a checkpoint unusable: a workdir refuses a config that differs here.
MODEL_SHAPE_KEYS = (
    "vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_len", "positions",
    "norm", "mlp", "use_bias", "tie_embeddings", "param_dtype", "scan_layers",
    "num_kv_heads", "qkv_bias",
)


def model_shape_diff(old: StageConfig, new: StageConfig) -> list[str]:
  """Human-readable differences between two configs on the keys that fix parameter shapes."""
  diffs = []
  for key in MODEL_SHAPE_KEYS:
    a, b = getattr(old.model, key), getattr(new.model, key)
    if a != b:
      diffs.append(f"model.{key}: {a!r} -> {b!r}")
  return diffs


def sibling(experiment_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """get_config(*args) of the experiment `name` beside `experiment_file` (experiments build on
  each other wherever gptjax is launched from)."""
  path = os.path.join(os.path.dirname(os.path.abspath(experiment_file)), name + ".py")
  return runpy.run_path(path)["get_config"](*args)
