"""The train loop every stage shares: one pure `train_step`, one `eval_step`, one `train`.

Stages differ only in the batches they feed (pretraining weighs every token 1; the dialogue
stage builds other per-token weights), never in this loop.
"""

import dataclasses
import functools
import math
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from gptjax import checkpoint as ckpt_lib
from gptjax import data as data_lib
from gptjax import loss as loss_lib
from gptjax import metrics as metrics_lib
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax import workdir as workdir_lib

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before saving the bad state."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(**config.model.to_dict())


def make_optimizer(config: ml_collections.ConfigDict):
  t = config.train
  return optim.make_optimizer(
      learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, steps=t.steps,
      min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
      grad_clip=t.grad_clip)


# ----------------------------------------------------------------------------- the steps


def _loss_sums(params, batch, *, model, rng, train: bool):
  logits_BLV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["positions"], deterministic=not train,
                           rngs={"dropout": rng} if train else {})
  return loss_lib.weighted_nll(logits_BLV, batch["targets"], batch["weights"])


def train_step(state: TrainState, batch, *, model, tx, schedule, rng, grad_accum_steps: int = 1):
  """One optimizer step on a global batch: (state, batch) -> (state, metrics).

  With `grad_accum_steps` > 1 the batch is split into micro-batches whose gradients are
  summed before one update; losses are sums over weighted tokens divided once by the total
  weight, so the update equals that of the whole batch at once.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(functools.partial(_loss_sums, model=model, train=True),
                               has_aux=True)
  if grad_accum_steps == 1:
    (loss_sum, weight_sum), grads = grad_fn(state.params, batch, rng=step_rng)
  else:
    # Row i goes to micro-batch i % A, so every device contributes to every micro-batch.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, xs):
      i, mb = xs
      (s, w), g = grad_fn(state.params, mb, rng=jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, carry, (s, w, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    (loss_sum, weight_sum, grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
  denom = jnp.maximum(weight_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads),
             "lr": schedule(state.step), "tokens": weight_sum}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """Sums over one eval batch: {"loss_sum", "weight_sum"}."""
  loss_sum, weight_sum = _loss_sums(params, batch, model=model, rng=None, train=False)
  return {"loss_sum": loss_sum, "weight_sum": weight_sum}


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Programs:
  """A model and optimizer bound to a mesh: sharded init, train and eval steps."""
  model: model_lib.Transformer
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Any  # rng -> TrainState, created directly sharded.
  train_step: Any  # (state, batch) -> (state, metrics), state donated.
  eval_step: Any  # (params, batch) -> sums.

  def abstract_state(self):
    """The state's shapes and shardings, without allocating it."""
    shapes = jax.eval_shape(self.init, jax.random.key(0))
    return ckpt_lib.abstract_like(shapes, self.state_shardings)


def _under_mesh(fn, mesh, rules):
  """Traces `fn` with the mesh and logical rules in scope, so activation constraints apply."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def compile_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Programs:
  """Builds the model, optimizer and jitted steps for `config` on `mesh`."""
  cfg = model_config(config)
  model = model_lib.Transformer(cfg)
  tx, schedule = make_optimizer(config)
  rules = sharding.rules_tuple(config.mesh.rules)
  seq_len = config.data.seq_len

  def init_boxed(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": rng, "dropout": rng}, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # Optimizer moments inherit their parameter's logical names, so they shard the same way.
  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  sharding.check_divisible(nn.unbox(boxed), state_shardings, mesh)

  def init(rng):
    return nn.unbox(init_boxed(rng))

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  data_rng = jax.random.key(config.train.seed + 1)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, rng=data_rng,
                           grad_accum_steps=config.train.grad_accum_steps)
  return Programs(
      model=model, mesh=mesh, rules=rules, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(_under_mesh(init, mesh, rules), out_shardings=state_shardings),
      train_step=jax.jit(_under_mesh(step, mesh, rules),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(_under_mesh(functools.partial(eval_step, model=model), mesh, rules),
                        in_shardings=(state_shardings.params, batch_sharding),
                        out_shardings=replicated),
  )


def global_batch(batch: dict, batch_sharding) -> dict:
  """This process's rows -> one global jax.Array per key."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k]))
          for k in BATCH_KEYS}


# ----------------------------------------------------------------------------- checks


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Raises a one-line, actionable error for a config that cannot run on `mesh`."""
  m, d, t = config.model, config.data, config.train
  if d.seq_len > m.max_len:
    raise ValueError(f"data.seq_len={d.seq_len} is above model.max_len={m.max_len}; lower "
                     "--config.data.seq_len or raise --config.model.max_len.")
  dp = sharding.data_parallel_size(mesh)
  if t.batch_size % dp:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the data-parallel "
                     f"size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
                     f"use a multiple of {dp}.")
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes; use a multiple of it.")
  if (t.batch_size // dp) % t.grad_accum_steps:
    raise ValueError(f"train.grad_accum_steps={t.grad_accum_steps} does not divide the "
                     f"{t.batch_size // dp} rows each data-parallel shard holds; choose a "
                     "divisor.")
  for key in ("steps", "log_every", "checkpoint_every"):
    if t[key] <= 0:
      raise ValueError(f"train.{key}={t[key]} must be positive.")


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  last_train: dict  # Mean train metrics of the last logging window.
  last_eval: dict | None  # Metrics of the last evaluation.


def evaluate(programs: Programs, params, batches) -> dict:
  """Loss and perplexity over `batches` (global numpy batches); every token counted once."""
  sums = None
  lo, hi = _local_rows(programs, batches[0]["inputs"].shape[0]) if batches else (0, 0)
  for batch in batches:
    local = {k: batch[k][lo:hi] for k in BATCH_KEYS}
    out = programs.eval_step(params, global_batch(local, programs.batch_sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  tokens = float(sums["weight_sum"])
  loss = float(sums["loss_sum"]) / max(tokens, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _local_rows(programs: Programs, global_rows: int) -> tuple[int, int]:
  per = global_rows // jax.process_count()
  return jax.process_index() * per, (jax.process_index() + 1) * per


def _check_finite(window: list[dict], first_step: int):
  # A finite loss with non-finite gradients still poisons the parameters, so check both.
  for i, m in enumerate(window):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      raise NonFiniteLossError(f"Loss is {float(m['loss'])} (gradient norm "
                               f"{float(m['grad_norm'])}) at step {first_step + i + 1}")


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
          progress: bool = True) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  validate(config, mesh)
  d, t = config.data, config.train
  train_source = data_lib.load_source(d.dataset, d.train_split, d.data_dir)
  eval_source = data_lib.load_source(d.dataset, d.eval_split, d.data_dir) if d.eval_split else None
  train_docs = data_lib.text_documents(train_source, field=d.text_field,
                                       chunk_chars=d.chunk_chars)
  tokenizer = workdir_lib.prepare(config, workdir, train_docs)

  programs = compile_programs(config, mesh)
  local_batch = t.batch_size // jax.process_count()
  train_ds = data_lib.make_pretrain_dataset(
      train_docs, tokenizer, seq_len=d.seq_len, batch_size=local_batch, seed=t.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = iter(train_ds)
  eval_batches = []
  if eval_source is not None:
    eval_docs = data_lib.text_documents(eval_source, field=d.text_field,
                                        chunk_chars=d.chunk_chars)
    # Every process reads the whole (small) eval split in the same order and evaluates its
    # slice of each global batch, so all processes run the same number of eval steps.
    eval_ds = data_lib.make_pretrain_dataset(
        eval_docs, tokenizer, seq_len=d.seq_len, batch_size=t.batch_size, seed=t.seed,
        shuffle=False, num_epochs=1)
    for i, batch in enumerate(eval_ds):
      if d.eval_batches and i >= d.eval_batches:
        break
      eval_batches.append(batch)

  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(workdir),
                                     max_to_keep=t.max_to_keep)
  writer = metrics_lib.MetricsWriter(workdir, stage=config.stage,
                                     primary=jax.process_index() == 0)
  start = checkpoints.latest_step()
  if start is None:
    state = programs.init(jax.random.key(t.seed))
    start = 0
  else:
    state = checkpoints.restore(start, programs.abstract_state(), train_iter)
  writer.truncate_after(start)

  primary = jax.process_index() == 0
  bar = tqdm.tqdm(total=t.steps, initial=start, disable=not (progress and primary),
                  dynamic_ncols=True, mininterval=1.0)
  window, window_start = [], start
  window_time, timed_steps = time.perf_counter(), 0
  last_train, last_eval, evaluated_at = {}, None, None
  last_saved = f"step {start}" if start else "none yet"
  try:
    for step in range(start + 1, t.steps + 1):
      batch = global_batch(next(train_iter), programs.batch_sharding)
      state, metrics = programs.train_step(state, batch)
      window.append(metrics)  # Device arrays: no host sync until the window is logged.
      timed_steps += 1
      if step == start + 1 and step % t.log_every:
        # Keep compilation out of tokens/s: time the window from the first step's end.
        jax.block_until_ready(metrics)
        window_time, timed_steps = time.perf_counter(), 0
      is_last = step == t.steps
      must_save = is_last or step % t.checkpoint_every == 0
      must_eval = bool(eval_batches) and (is_last or (t.eval_every and step % t.eval_every == 0))
      # Metrics are checked before any eval or save, so a bad state is never saved.
      if must_save or must_eval or step % t.log_every == 0:
        window = jax.device_get(window)
        _check_finite(window, window_start)
        elapsed = time.perf_counter() - window_time
        last_train = {k: float(np.mean([m[k] for m in window])) for k in ("loss", "grad_norm")}
        last_train["lr"] = float(window[-1]["lr"])
        last_train["tokens_per_sec"] = t.batch_size * d.seq_len * max(timed_steps, 1) / elapsed
        writer.write(step, "train", last_train)
        bar.set_postfix(loss=f"{last_train['loss']:.3f}",
                        tok_s=f"{last_train['tokens_per_sec']:.0f}", refresh=False)
        bar.update(step - window_start)
        window, window_start = [], step
        window_time, timed_steps = time.perf_counter(), 0
      if must_eval:
        last_eval, evaluated_at = evaluate(programs, state.params, eval_batches), step
        writer.write(step, "eval", last_eval)
        window_time = time.perf_counter()  # Keep eval time out of tokens/s.
      if must_save:
        checkpoints.save(step, state, train_iter,
                         eval_loss=last_eval["loss"] if evaluated_at == step else None)
        last_saved = f"step {step}"
    checkpoints.wait()
  except NonFiniteLossError as e:
    checkpoints.wait()
    raise NonFiniteLossError(
        f"{e}; training stopped. The last good checkpoint ({last_saved}) in "
        f"{checkpoints.directory} is untouched; lower train.learning_rate or raise "
        "train.warmup_steps and rerun to resume from it.") from None
  finally:
    bar.close()
    writer.close()
    checkpoints.close()
  return TrainResult(state=state, last_train=last_train, last_eval=last_eval)
