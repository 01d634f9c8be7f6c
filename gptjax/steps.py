"""The steps every stage shares: one pure `train_step` and one `eval_step`, compiled once
with explicit shardings for a config on a mesh (`Programs`).

Stages differ only in the batches they feed (pretraining weighs every token 1; the dialogue
stage builds other per-token weights), never in these steps.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gptjax import checkpoint as ckpt_lib
from gptjax import classify as classify_lib
from gptjax import config as config_lib
from gptjax import lora as lora_lib
from gptjax import loss as loss_lib
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(t: config_lib.TrainConfig, num_layers: int):
  return optim.make_optimizer(
      learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, steps=t.steps,
      min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
      grad_clip=t.grad_clip, trainable=t.trainable, num_layers=num_layers)


# ----------------------------------------------------------------------------- the steps


def _loss_sums(params, batch, *, model, rng, train: bool, embed_delta_BLD=None):
  """(objective sum, all sums): the first is what gradients are taken of."""
  logits_BLV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["positions"], deterministic=not train,
                           rngs={"dropout": rng} if train else {},
                           embed_delta_BLD=embed_delta_BLD)
  sums = loss_lib.loss_sums(logits_BLV, batch)
  return sums["loss_sum"], sums


def fgm_perturbation(grad_BLD, epsilon: float):
  """FGM's perturbation (Miyato et al. 2017): the loss gradient w.r.t. the input embeddings,
  scaled to L2 norm `epsilon` over each row's [L, D] (a row of zero gradient stays zero)."""
  g = jax.lax.stop_gradient(grad_BLD.astype(jnp.float32))
  norm_B11 = jnp.sqrt((g * g).sum(axis=(1, 2), keepdims=True))
  delta_BLD = epsilon * g / jnp.maximum(norm_B11, 1e-12)
  return nn.with_logical_constraint(delta_BLD, ("batch", "act_length", "act_embed"))


def grads_and_sums(loss_sums_fn, params, batch, rng, *, adversarial: str = "none",
                   epsilon: float = 0.0, width: int = 0):
  """(gradient of the summed objective, sums) of one (micro-)batch.

  `loss_sums_fn(params, batch, rng, embed_delta_BLD) -> (objective sum, sums)` is the stage's
  loss; `width` is the model's d_model. With adversarial="fgm" the objective is the mean of the clean loss and the loss on
  embeddings perturbed by `fgm_perturbation` (the 1/2 keeps it on the plain loss's scale, so
  epsilon 0 is the plain step): two forward and backward passes in the one compiled step, the
  first also giving the gradient w.r.t. the embeddings, both with the same dropout mask.
  """
  if adversarial == "none":
    return jax.grad(lambda p: loss_sums_fn(p, batch, rng, None), has_aux=True)(params)
  B, L = batch["inputs"].shape
  grad_fn = jax.grad(lambda p, d: loss_sums_fn(p, batch, rng, d), argnums=(0, 1),
                     has_aux=True)
  zeros_BLD = nn.with_logical_constraint(jnp.zeros((B, L, width), jnp.float32),
                                         ("batch", "act_length", "act_embed"))
  (clean, delta_grad_BLD), sums = grad_fn(params, zeros_BLD)
  (adv, _), adv_sums = grad_fn(params, fgm_perturbation(delta_grad_BLD, epsilon))
  grads = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, clean, adv)
  sums = {**sums, "adv_loss_sum": adv_sums["loss_sum"]}
  return grads, sums


def train_step(state: TrainState, batch, *, model, tx, schedule, rng, grad_accum_steps: int = 1,
               trainable: str = "all", adversarial: str = "none", epsilon: float = 0.0,
               loss_sums_fn=None):
  """One optimizer step on a global batch: (state, batch) -> (state, metrics).

  With `grad_accum_steps` > 1 the batch is split into micro-batches whose gradients are
  summed before one update; losses are sums over weighted tokens divided once by the total
  weight, so the update equals that of the whole batch at once. `adversarial` / `epsilon`:
  see `grads_and_sums`; `loss_sums_fn` replaces the language-model loss (another stage kind).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if loss_sums_fn is None:
    loss_sums_fn = lambda p, b, r, d: _loss_sums(p, b, model=model, rng=r, train=True,
                                                 embed_delta_BLD=d)
  grad_fn = functools.partial(grads_and_sums, loss_sums_fn, adversarial=adversarial,
                              epsilon=epsilon, width=model.cfg.d_model)
  if grad_accum_steps == 1:
    grads, sums = grad_fn(state.params, batch, step_rng)
  else:
    # Row i goes to micro-batch i % A, so every device contributes to every micro-batch.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, xs):
      i, mb = xs
      return jax.tree.map(jnp.add, carry,
                          grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))), None

    zeros = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                           step_rng)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
  denom = jnp.maximum(sums["weight_sum"], 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The norm that clipping sees: of the trainable gradients only (frozen ones are zeroed).
  grad_norm = optax.global_norm(optim.mask_frozen(grads, trainable,
                                                  model.cfg.num_layers))
  metrics = {**loss_lib.means(sums), "grad_norm": grad_norm, "lr": schedule(state.step)}
  if "adv_loss_sum" in sums:
    metrics["adv_loss"] = sums["adv_loss_sum"] / denom
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """Loss sums over one eval batch (see loss.loss_sums)."""
  return _loss_sums(params, batch, model=model, rng=None, train=False)[1]


def lora_train_step(state: TrainState, batch, base, *, model, lora: config_lib.LoraConfig,
                    loss_sums_fn=None, **kwargs):
  """train_step of a LoRA stage: `state.params` are the adapters; `base` is a constant
  argument, so gradients and optimizer state exist for the adapters only (gptjax/lora.py).
  `loss_sums_fn` (default: the language-model loss) sees the merged parameters."""

  def merged_loss(adapters, b, rng, delta_BLD):
    params = lora_lib.merge(base, adapters, lora, rng=jax.random.fold_in(rng, 1))
    if loss_sums_fn is not None:
      return loss_sums_fn(params, b, rng, delta_BLD)
    return _loss_sums(params, b, model=model, rng=rng, train=True, embed_delta_BLD=delta_BLD)

  return train_step(state, batch, model=model, loss_sums_fn=merged_loss, **kwargs)


def lora_eval_step(adapters, batch, base, *, lora: config_lib.LoraConfig, evaluate):
  """`evaluate` (an eval step) of the base with the adapters folded in."""
  return evaluate(lora_lib.merge(base, adapters, lora), batch)


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class WithBase:
  """A LoRA step jitted as f(..., base), called as f(...) with the frozen base bound."""
  fn: Any
  base: Any  # The base parameters (arrays, or ShapeDtypeStructs to lower).

  def __call__(self, *args):
    return self.fn(*args, self.base)

  def lower(self, *args):
    return self.fn.lower(*args, self.base)


@dataclasses.dataclass
class Programs:
  """A model and optimizer bound to a mesh: sharded init, train and eval steps.

  For a LoRA stage the state's params are the adapters, and the steps take the frozen base
  parameters bound by `with_base` (until then, `abstract_base` stands in, for lowering only).
  """
  model: model_lib.Transformer
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Any  # rng -> TrainState, created directly sharded.
  train_step: Any  # (state, batch) -> (state, metrics), state donated.
  eval_step: Any  # (params, batch) -> sums.
  abstract_base: Any = None  # LoRA: the base parameters' shapes and shardings.

  def with_base(self, base) -> "Programs":
    """These programs with a LoRA stage's base parameters bound into its steps."""
    return dataclasses.replace(self, train_step=WithBase(self.train_step.fn, base),
                               eval_step=WithBase(self.eval_step.fn, base))

  def abstract_state(self):
    """The state's shapes and shardings, without allocating it."""
    shapes = jax.eval_shape(self.init, jax.random.key(0))
    return ckpt_lib.abstract_like(shapes, self.state_shardings)


def compile_programs(config: config_lib.StageConfig, mesh: jax.sharding.Mesh) -> Programs:
  """Builds the model, optimizer and jitted steps for `config` on `mesh`."""
  model = model_lib.Transformer(config.model)
  tx, schedule = make_optimizer(config.train, config.model.num_layers)
  rules = sharding.rules_tuple(config.mesh.rules)
  seq_len = config.data.seq_len

  lora = config.lora
  classifier = config.data.kind == "classify"
  num_classes = len(config.classify.label_names)
  base_boxed = jax.eval_shape(
      lambda rng: model.init({"params": rng, "dropout": rng},
                             jnp.zeros((1, seq_len), jnp.int32))["params"],
      jax.random.key(0)) if lora.rank else None

  def init_boxed(rng):
    if lora.rank:
      params = lora_lib.init(rng, base_boxed, lora)
    else:
      params = model.init({"params": rng, "dropout": rng},
                          jnp.zeros((1, seq_len), jnp.int32))["params"]
    if classifier:
      params = {**params, classify_lib.HEAD: classify_lib.init_head(
          jax.random.fold_in(rng, 1), config.model.d_model, num_classes)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # Optimizer moments inherit their parameter's logical names, so they shard the same way.
  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  sharding.check_divisible(nn.unbox(boxed), state_shardings, mesh)

  def init(rng):
    return nn.unbox(init_boxed(rng))

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dropout_rng = jax.random.key(config.train.seed + 1)
  step_kwargs = {"model": model, "tx": tx, "schedule": schedule, "rng": dropout_rng,
                 "grad_accum_steps": config.train.grad_accum_steps,
                 "trainable": config.train.trainable, "adversarial": config.train.adversarial,
                 "epsilon": config.train.adversarial_epsilon}
  jit_init = jax.jit(sharding.under_mesh(init, mesh, rules), out_shardings=state_shardings)
  evaluate = functools.partial(eval_step, model=model)
  if classifier:
    heads = {"model": model, "pool": config.classify.pool, "num_classes": num_classes}
    step_kwargs["loss_sums_fn"] = classify_lib.loss_sums_fn(**heads)
    evaluate = functools.partial(classify_lib.eval_step, **heads)
  if not lora.rank:
    step = functools.partial(train_step, **step_kwargs)
    return Programs(
        model=model, mesh=mesh, rules=rules, state_shardings=state_shardings,
        batch_sharding=batch_sharding, init=jit_init,
        train_step=jax.jit(sharding.under_mesh(step, mesh, rules),
                           in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval_step=jax.jit(sharding.under_mesh(evaluate, mesh, rules),
                          in_shardings=(state_shardings.params, batch_sharding),
                          out_shardings=replicated),
    )
  base_shardings = sharding.logical_shardings(base_boxed, mesh, rules)
  abstract_base = ckpt_lib.abstract_like(nn.unbox(base_boxed), base_shardings)
  step = functools.partial(lora_train_step, lora=lora, **step_kwargs)
  evaluate = functools.partial(lora_eval_step, lora=lora, evaluate=evaluate)
  return Programs(
      model=model, mesh=mesh, rules=rules, state_shardings=state_shardings,
      batch_sharding=batch_sharding, init=jit_init, abstract_base=abstract_base,
      train_step=WithBase(jax.jit(sharding.under_mesh(step, mesh, rules),
                                  in_shardings=(state_shardings, batch_sharding, base_shardings),
                                  out_shardings=(state_shardings, replicated),
                                  donate_argnums=0), abstract_base),
      eval_step=WithBase(jax.jit(sharding.under_mesh(evaluate, mesh, rules),
                                 in_shardings=(state_shardings.params, batch_sharding,
                                               base_shardings),
                                 out_shardings=replicated), abstract_base),
  )


def programs_for(config: config_lib.StageConfig) -> Programs:
  """`config`'s programs on a mesh of this machine's devices, once the config is checked."""
  mesh = sharding.make_mesh(config.mesh.sizes)
  validate(config, mesh)
  return compile_programs(config, mesh)


# ----------------------------------------------------------------------------- checks


def validate(config: config_lib.StageConfig, mesh: jax.sharding.Mesh):
  """Raises a one-line, actionable error for a config that cannot run on `mesh` (the checks
  that need no mesh ran when the StageConfig was built)."""
  t = config.train
  dp = sharding.data_parallel_size(mesh)
  if t.batch_size % dp:
    raise UserError(f"train.batch_size={t.batch_size} is not divisible by the data-parallel "
                    f"size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
                    f"use a multiple of {dp}.")
  if t.batch_size % jax.process_count():
    raise UserError(f"train.batch_size={t.batch_size} is not divisible by the "
                    f"{jax.process_count()} processes; use a multiple of it.")
  if (t.batch_size // dp) % t.grad_accum_steps:
    raise UserError(f"train.grad_accum_steps={t.grad_accum_steps} does not divide the "
                    f"{t.batch_size // dp} rows each data-parallel shard holds; choose a "
                    "divisor.")
