"""AdamW with linear warm-up, cosine decay, global-norm clipping and masked weight decay."""

import jax
import optax


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


def make_optimizer(*, learning_rate: float, warmup_steps: int, steps: int, min_lr_ratio: float,
                   weight_decay: float, b1: float, b2: float, eps: float,
                   grad_clip: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its schedule (the schedule is also logged as `lr`)."""
  schedule = lr_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps, steps=steps,
                         min_lr_ratio=min_lr_ratio)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
