"""LoRA (Hu et al. 2021): low-rank adapters beside frozen base weights, as a transform of the
parameter tree (the linen modules know nothing of it).

For each targeted kernel W (viewed as [in, out]) an adapter holds A [in, r] and B [r, out],
B zero at init; the effective kernel is W + (alpha / r) * A @ B. `merge` folds every adapter
into a copy of the base parameters; the train step differentiates the loss of
`merge(base, adapters)` with respect to the adapters only, the base entering the compiled
step as a constant argument, so there are no base gradients to keep and the optimizer state
is adapter-shaped. Evaluation, sampling and `gptjax merge` use the same `merge`.

Dropout (`model.lora.dropout`) acts on the adapter path's input features: with the adapters
folded into the kernel it cannot vary per token, so each step draws one mask over A's input
rows per adapter (dropping input feature i of the adapter for the whole batch), scaled by
1 / (1 - rate). Evaluation and sampling use no dropout.

Adapters are nested like the base: adapters[block][module][kernel][part] = {"lora_a",
"lora_b"}, `part` naming a slice of a fused kernel ("q", "k", "v" of the fused qkv) or "all".
Their logical axis names come from the base kernel's (its first input and first output axis)
and "lora_rank", so they shard like the kernel they adapt.

Token rows (`model.lora.train_tokens`, like PEFT's trainable_token_indices): tokens the base
never saw in training (the chat tokens, for a base pretrained on plain text) keep embeddings
that pretraining only pushed away from being predicted, all in nearly one direction, and no
low-rank adapter on the blocks can tell <|user|> from <|assistant|> through them. So those
rows train as a delta, adapters[TOKENS] = {"embedding": [N, D]} (plus {"head": [D, N]} for an
untied output head; a tied head sees the embedding's rows), zero at init and added to the
base's rows by `merge`, with the logical names "lora_tokens" and the embedding's "embed".
`merge` is a pure function of (base, adapters) and folds everything: the train step, eval,
sampling, serving, `gptjax merge` and `export-hf` all go through it.
"""

import functools
import hashlib
import math
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import checkpoint as ckpt_lib
from gptjax import classify as classify_lib
from gptjax import config as config_lib
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError

# Target name (model.lora.targets) -> kernels it adapts: (path inside a block, index of the
# slice on the axis after the input axes, or None for the whole kernel, number of input axes).
# The one place that knows the model's parameter layout: update it when the model's names change.
TARGETS = {
    # The fused projection qkv [D, 3, H, K], or with grouped-query attention (num_kv_heads
    # below num_heads) q [D, H, K] and kv [D, 2, G, K].
    "q": ((("attn", "qkv"), 0, 1), (("attn", "q"), None, 1)),
    "k": ((("attn", "qkv"), 1, 1), (("attn", "kv"), 0, 1)),
    "v": ((("attn", "qkv"), 2, 1), (("attn", "kv"), 1, 1)),
    "o": ((("attn", "out"), None, 2),),
    "mlp_in": ((("mlp", "wi"), None, 1), (("mlp", "wi_gate"), None, 1),
               (("mlp", "wi_up"), None, 1)),
    "mlp_out": ((("mlp", "wo"), None, 1),),
}
WHOLE = "all"  # Part name of an adapter on a whole kernel.
TOKENS = "token_rows"  # Top-level adapter entry of the trainable token rows.
CHAT_TOKENS = "chat"  # model.lora.train_tokens naming the tokenizer's chat tokens.


def token_ids(train_tokens: str, tokenizer=tokenizer_lib.Tokenizer) -> tuple[int, ...]:
  """Ids `model.lora.train_tokens` names: "chat" is `tokenizer`'s system, user, assistant and
  end tokens (by default gptjax's reserved layout; a run pins its own tokenizer's ids into its
  config.json, as an imported tokenizer has them elsewhere)."""
  if train_tokens == CHAT_TOKENS:
    return (tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id)
  return tuple(int(t) for t in train_tokens.split(",") if t.strip())


def _blocks(params) -> list[tuple[str, int]]:
  """(block key, leading layer axes) of every block: scanned `blocks` carry one layer axis."""
  return [(k, 1 if k == "blocks" else 0) for k in params
          if k == "blocks" or k.startswith("block_")]


def _get(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def sites(params, targets: tuple[str, ...]):
  """[(block, module, kernel, part, index, n_in, lead)] of every kernel the targets adapt in
  `params` (arrays, ShapeDtypeStructs or boxed); raises if a target matches nothing."""
  out = []
  for name in targets:
    found = False
    for block, lead in _blocks(params):
      for (module, kernel), index, n_in in TARGETS[name]:
        if _get(params, (block, module, kernel)) is None:
          continue
        found = True
        out.append((block, module, kernel, name if index is not None else WHOLE, index, n_in,
                    lead))
    if not found:
      raise ValueError(f"LoRA target {name!r} matches no parameter of this model "
                       f"(TARGETS in gptjax/lora.py maps it to {TARGETS[name]}).")
  return out


def _split_shape(shape, index, n_in, lead):
  """(leading dims, input dims, output dims) of a kernel's (slice's) shape."""
  rest = shape[lead:]
  out = rest[n_in + (index is not None):]
  return shape[:lead], rest[:n_in], out


def _shape_names(boxed):
  """(shape, dtype, logical names) of a boxed (nn.Partitioned) or plain parameter."""
  if isinstance(boxed, nn.Partitioned):
    return boxed.value.shape, boxed.value.dtype, tuple(boxed.names)
  return boxed.shape, boxed.dtype, (None,) * len(boxed.shape)


def init(rng, boxed_base, lora: config_lib.LoraConfig):
  """Boxed adapters (nn.Partitioned) for `boxed_base`'s shapes and names: A ~ N(0, 1/in),
  B = 0 and token-row deltas 0, so the adapted model starts exactly at the base."""
  rank = lora.rank
  adapters = {}
  for i, (block, module, kernel, part, index, n_in, lead) in enumerate(
      sites(boxed_base, lora.target_names)):
    shape, dtype, names = _shape_names(boxed_base[block][module][kernel])
    lead_dims, in_dims, out_dims = _split_shape(shape, index, n_in, lead)
    d_in, d_out = math.prod(in_dims), math.prod(out_dims)
    lead_names = tuple(names[:lead])
    in_name = names[lead]
    out_name = names[lead + n_in + (index is not None)]
    a = jax.random.normal(jax.random.fold_in(rng, i), (*lead_dims, d_in, rank), dtype)
    a = a / math.sqrt(d_in)
    b = jnp.zeros((*lead_dims, rank, d_out), dtype)
    entry = {"lora_a": nn.LogicallyPartitioned(a, names=(*lead_names, in_name, "lora_rank")),
             "lora_b": nn.LogicallyPartitioned(b, names=(*lead_names, "lora_rank", out_name))}
    adapters.setdefault(block, {}).setdefault(module, {}).setdefault(kernel, {})[part] = entry
  n = len(lora.token_ids)
  if n:
    (_, d), dtype, (_, embed) = _shape_names(boxed_base["embedding"])
    rows = {"embedding": nn.LogicallyPartitioned(jnp.zeros((n, d), dtype),
                                                 names=("lora_tokens", embed))}
    if "head" in boxed_base:  # Untied: the output columns of the same tokens.
      (d, _), dtype, (embed, _) = _shape_names(boxed_base["head"])
      rows["head"] = nn.LogicallyPartitioned(jnp.zeros((d, n), dtype),
                                             names=(embed, "lora_tokens"))
    adapters[TOKENS] = rows
  return adapters


def _layout(module: str, kernel: str, part: str) -> tuple[int | None, int]:
  """(slice index, input axes) of adapter `part` on kernel module/kernel, from TARGETS."""
  names = TARGETS if part == WHOLE else {part: TARGETS[part]}
  for entries in names.values():
    for (m, k), index, n_in in entries:
      if (m, k) == (module, kernel) and (index is None) == (part == WHOLE):
        return index, n_in
  raise KeyError(f"no LoRA target adapts {module}/{kernel} as {part!r}")


def merge(base, adapters, lora: config_lib.LoraConfig, rng=None):
  """The base parameters with every adapter folded in: W + (alpha / rank) * A @ B, and the
  token rows added to theirs.

  `rng` (training only) draws the adapter-input dropout masks (see the module docstring).
  Exact at init: B = 0 and the row deltas add zeros, so the result equals `base` bit for bit.
  Other top-level entries of `adapters` that the base lacks are new parameters that train
  beside the adapters (a classification head): they are copied into the result as they are.
  """
  scale, dropout = lora.alpha / lora.rank, lora.dropout
  merged = jax.tree.map(lambda x: x, base)  # New dicts; arrays shared until replaced.
  i = 0
  for block, modules in adapters.items():
    if block == TOKENS:
      merged.update(_fold_rows(merged, modules, lora.token_ids))
      continue
    if block not in base:
      merged[block] = modules
      continue
    lead = 1 if block == "blocks" else 0
    for module, kernels in modules.items():
      for kernel, parts in kernels.items():
        w = merged[block][module][kernel]
        for part, ab in parts.items():
          a, b = ab["lora_a"].astype(jnp.float32), ab["lora_b"].astype(jnp.float32)
          if rng is not None and dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - dropout,
                                        a.shape[:-1] + (1,))
            a = jnp.where(keep, a / (1.0 - dropout), 0.0)
          i += 1
          index, n_in = _layout(module, kernel, part)
          _, in_dims, out_dims = _split_shape(w.shape, index, n_in, lead)
          delta = scale * jnp.einsum("...ir,...ro->...io", a, b)
          delta = delta.reshape(*w.shape[:lead], *in_dims, *out_dims).astype(w.dtype)
          if index is None:
            w = w + delta
          else:
            w = w.at[(slice(None),) * (lead + len(in_dims)) + (index,)].add(delta)
        merged[block][module][kernel] = w
  return merged


def _fold_rows(params, rows, ids: tuple[int, ...]) -> dict:
  """The embedding (and untied head) with the token rows' deltas added at `ids`."""
  ids = jnp.asarray(ids, jnp.int32)
  out = {}
  for name, delta in rows.items():
    w = params[name]
    # The embedding is [V, D] and the head [D, V]: the vocabulary axis comes first or last.
    index = (ids,) if name == "embedding" else (slice(None), ids)
    out[name] = w.at[index].add(delta.astype(w.dtype))
  return out


def count(adapters) -> int:
  """Trainable values in `adapters`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


# ----------------------------------------------------------------------------- workdirs
# A LoRA workdir's checkpoints hold the adapters and their optimizer state; its config.json
# names the base (init_from, pinned to a step), which is checked whenever it is loaded.


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def base_source(config, workdir: str) -> tuple[str, int]:
  """(base workdir, step) of a LoRA run, checked: it exists, has the same model shape and the
  same tokenizer (by SHA-256) as `workdir`."""
  base, step = config.init_from, config.init_from_step
  if not os.path.isdir(base) or not step.isdigit():
    raise UserError(f"The LoRA base init_from={base!r} (step {step}) of {workdir} is gone; "
                    "restore that workdir, or retrain the adapters from an existing base.")
  diffs = config_lib.model_shape_diff(workdir_lib.read_config(base), config)
  if diffs:
    raise UserError(f"The LoRA base {base} now has another model shape ({'; '.join(diffs)}); "
                    "restore the base the adapters were trained on.")
  own, theirs = workdir_lib.tokenizer_path(workdir), workdir_lib.tokenizer_path(base)
  if os.path.exists(own) and os.path.exists(theirs) and _sha256(own) != _sha256(theirs):
    raise UserError(f"The tokenizer of the LoRA base {base} differs from {own} (SHA-256 "
                    f"{_sha256(theirs)[:12]} != {_sha256(own)[:12]}); restore the base the "
                    "adapters were trained on.")
  return base, int(step)


def load_params(workdir: str, step: int, abstract_params):
  """Plain parameters of checkpoint `step` of a run onto `abstract_params`' shardings: for a
  LoRA run, its base's (recursively) with the adapters folded in."""
  config = workdir_lib.read_config(workdir)
  with ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as checkpoints:
    if not config.lora.rank:
      return checkpoints.restore_params(step, abstract_params)
    from gptjax import steps as steps_lib  # pylint: disable=import-outside-toplevel  (imports lora)
    mesh = jax.tree.leaves(abstract_params)[0].sharding.mesh
    programs = steps_lib.compile_programs(config, mesh)
    adapters = checkpoints.restore_params(step, programs.abstract_state().params)
  # Parameters the base lacks (a classification head) come with the adapters.
  base = load_params(*base_source(config, workdir),
                     {k: v for k, v in abstract_params.items() if k != classify_lib.HEAD})
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  fold = functools.partial(merge, lora=config.lora)
  return jax.jit(fold, out_shardings=shardings)(base, adapters)


def load_checkpoint(workdir: str, step, abstract_params):
  """(parameters, step) of checkpoint `step` (None: latest, "best" or a number) of a run, as
  `load_params` gives them; the latest falls back to the newest step that restores if its
  arrays are damaged (Checkpoints.load). For readers: sampling, serving, classifying."""
  with ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as checkpoints:
    return checkpoints.load(step, lambda n: load_params(workdir, n, abstract_params))


def load_base(config, workdir: str, abstract_base):
  """The frozen base parameters a LoRA stage in `workdir` trains on."""
  return load_params(*base_source(config, workdir), abstract_base)


def merge_workdir(workdir: str, out: str, step=None) -> dict:
  """Writes `out`, a plain workdir whose parameters are `workdir`'s LoRA checkpoint `step`
  folded into its base (written to a temporary folder, then renamed: all or nothing)."""
  config = workdir_lib.read_config(workdir)
  if not config.lora.rank:
    raise UserError(f"{workdir} is not a LoRA run (model.lora.rank is 0); its checkpoints "
                    "already hold plain parameters.")
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise UserError(f"--out {out} exists; pass a new directory.")
  step = ckpt_lib.resolve_step(workdir_lib.checkpoint_dir(workdir), step)
  from gptjax import steps as steps_lib  # pylint: disable=import-outside-toplevel  (imports lora)
  plain = config.replace(lora={"rank": 0})
  programs = steps_lib.compile_programs(plain, sharding.make_mesh(plain.mesh.sizes))
  state = programs.init(jax.random.key(plain.train.seed))
  params = load_params(workdir, step, programs.abstract_state().params)
  # A fresh optimizer: a merged workdir serves, evaluates and starts later stages.
  state = state.replace(step=jnp.asarray(step, jnp.int32), params=params)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
  try:
    saver = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(tmp))
    saver.save(step, state)
    saver.wait()
    saver.close()
    shutil.copyfile(workdir_lib.tokenizer_path(workdir), workdir_lib.tokenizer_path(tmp))
    workdir_lib.atomic_write(workdir_lib.config_path(tmp), config_lib.to_json(plain))
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"workdir": out, "step": step, "base": config.init_from,
          "base_step": int(config.init_from_step)}
