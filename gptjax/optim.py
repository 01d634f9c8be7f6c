"""AdamW with linear warm-up, cosine decay, global-norm clipping and masked weight decay,
plus freezing: which parameters a fine-tuning stage trains at all.
"""

import re

import jax
import jax.numpy as jnp
import optax

from gptjax.errors import UserError


def lr_schedule(*, learning_rate: float, warmup_steps: int, steps: int,
                min_lr_ratio: float) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine to `learning_rate * min_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(steps, warmup_steps + 1), end_value=learning_rate * min_lr_ratio)


def decay_mask(params):
  """True for parameters that get weight decay: everything but norm scales and biases."""

  def decays(path, _):
    name = getattr(path[-1], "key", str(path[-1]))
    return not (name == "scale" or name == "bias" or name.endswith("_bias"))

  return jax.tree_util.tree_map_with_path(decays, params)


def _key(entry) -> str:
  return str(getattr(entry, "key", entry))


def check_trainable(trainable: str, num_layers: int):
  """Raises unless `trainable` is "all", "no_embed" or "top:N" with 0 <= N <= num_layers."""
  match = re.fullmatch(r"top:(\d+)", trainable)
  if trainable in ("all", "no_embed") or (match and int(match[1]) <= num_layers):
    return
  raise UserError(f"train.trainable={trainable!r} is not one of 'all', 'no_embed' or "
                   f"'top:N' with N <= {num_layers} layers; set --config.train.trainable.")


def trainable_factor(path, shape, *, trainable: str, num_layers: int):
  """1 where a parameter trains, 0 where it is frozen; per layer for scanned parameters.

  `no_embed` freezes the token and position embeddings. `top:N` trains the top N blocks, the
  final norm and the head; with tied embeddings the head is the embedding matrix, so it
  trains too.
  """
  names = [_key(p) for p in path]
  if trainable == "all":
    return 1.0
  if trainable == "no_embed":
    return 0.0 if names[-1] in ("embedding", "pos_embedding") else 1.0
  top = int(trainable.split(":")[1])
  first_trained = num_layers - top
  if names[0] == "blocks":  # Scanned: [layers, ...]; freeze the lower rows only.
    trained_L = (jnp.arange(num_layers) >= first_trained).astype(jnp.float32)
    return trained_L.reshape((num_layers,) + (1,) * (len(shape) - 1))
  if names[0].startswith("block_"):
    return float(int(names[0].split("_")[1]) >= first_trained)
  return 1.0 if names[0] in ("norm_final", "head", "embedding") else 0.0


def mask_frozen(tree, trainable: str, num_layers: int):
  """`tree` (gradients or updates) with its frozen entries zeroed (see trainable_factor)."""
  if trainable == "all":
    return tree
  return jax.tree_util.tree_map_with_path(
      lambda path, u: u * trainable_factor(path, u.shape, trainable=trainable,
                                           num_layers=num_layers), tree)


def freeze(trainable: str, num_layers: int) -> optax.GradientTransformation:
  """Multiplies gradients (or updates) by `trainable_factor`; stateless."""

  def update(updates, state, params=None):
    del params
    return mask_frozen(updates, trainable, num_layers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(*, learning_rate: float, warmup_steps: int, steps: int, min_lr_ratio: float,
                   weight_decay: float, b1: float, b2: float, eps: float, grad_clip: float,
                   trainable: str = "all", num_layers: int = 0,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its schedule (the schedule is also logged as `lr`)."""
  schedule = lr_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps, steps=steps,
                         min_lr_ratio=min_lr_ratio)
  check_trainable(trainable, num_layers)
  frozen = trainable != "all"
  # Frozen gradients are zeroed first, so clipping and grad_norm see trainable ones only, and
  # updates last, so weight decay never moves a frozen parameter.
  parts = [freeze(trainable, num_layers)] if frozen else []
  if grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  if frozen:
    parts.append(freeze(trainable, num_layers))
  return optax.chain(*parts), schedule
