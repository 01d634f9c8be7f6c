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
from gptjax import datasets
from gptjax import evaluate as evaluate_lib
from gptjax import loss as loss_lib
from gptjax import metrics as metrics_lib
from gptjax import model as model_lib
from gptjax import optim
from gptjax import sharding
from gptjax import workdir as workdir_lib


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
      grad_clip=t.grad_clip, trainable=t.trainable, num_layers=config.model.num_layers)


# ----------------------------------------------------------------------------- the steps


def _loss_sums(params, batch, *, model, rng, train: bool):
  """(objective sum, all sums): the first is what gradients are taken of."""
  logits_BLV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["positions"], deterministic=not train,
                           rngs={"dropout": rng} if train else {})
  sums = loss_lib.loss_sums(logits_BLV, batch)
  return sums["loss_sum"], sums


def train_step(state: TrainState, batch, *, model, tx, schedule, rng, grad_accum_steps: int = 1):
  """One optimizer step on a global batch: (state, batch) -> (state, metrics).

  With `grad_accum_steps` > 1 the batch is split into micro-batches whose gradients are
  summed before one update; losses are sums over weighted tokens divided once by the total
  weight, so the update equals that of the whole batch at once.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.grad(functools.partial(_loss_sums, model=model, train=True), has_aux=True)
  if grad_accum_steps == 1:
    grads, sums = grad_fn(state.params, batch, rng=step_rng)
  else:
    # Row i goes to micro-batch i % A, so every device contributes to every micro-batch.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, xs):
      i, mb = xs
      return jax.tree.map(jnp.add, carry,
                          grad_fn(state.params, mb, rng=jax.random.fold_in(step_rng, i))), None

    zeros = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                           rng=step_rng)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
  denom = jnp.maximum(sums["weight_sum"], 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**loss_lib.means(sums), "grad_norm": optax.global_norm(grads),
             "lr": schedule(state.step), "tokens": sums["weight_sum"]}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """Loss sums over one eval batch (see loss.loss_sums)."""
  return _loss_sums(params, batch, model=model, rng=None, train=False)[1]


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
  dropout_rng = jax.random.key(config.train.seed + 1)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, rng=dropout_rng,
                           grad_accum_steps=config.train.grad_accum_steps)
  return Programs(
      model=model, mesh=mesh, rules=rules, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(sharding.under_mesh(init, mesh, rules), out_shardings=state_shardings),
      train_step=jax.jit(sharding.under_mesh(step, mesh, rules),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(sharding.under_mesh(functools.partial(eval_step, model=model), mesh, rules),
                        in_shardings=(state_shardings.params, batch_sharding),
                        out_shardings=replicated),
  )


def programs_for(config: ml_collections.ConfigDict) -> Programs:
  """`config`'s programs on a mesh of this machine's devices, once the config is checked."""
  mesh = sharding.make_mesh(config.mesh)
  validate(config, mesh)
  return compile_programs(config, mesh)


def global_batch(batch: dict, batch_sharding) -> dict:
  """This process's rows -> one global jax.Array per key."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


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
  best_step: int | None = None  # Checkpoint with the lowest eval loss.
  stopped_early: bool = False
  seconds: float = 0.0  # Wall time of this call.


def _check_finite(window: list[dict], first_step: int):
  # A finite loss with non-finite gradients still poisons the parameters, so check both.
  for i, m in enumerate(window):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      raise NonFiniteLossError(f"Loss is {float(m['loss'])} (gradient norm "
                               f"{float(m['grad_norm'])}) at step {first_step + i + 1}")


class EarlyStopping:
  """Counts evaluations since the lowest eval loss; rebuilt from metrics.jsonl on resume."""

  def __init__(self, patience: int, eval_rows: list[dict]):
    self.patience, self.best, self.since = patience, math.inf, 0
    for row in eval_rows:
      self.update(row["loss"])

  def update(self, loss: float) -> bool:
    """Records an eval loss; True if it is the best so far."""
    improved = loss < self.best
    self.best, self.since = (loss, 0) if improved else (self.best, self.since + 1)
    return improved

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.since >= self.patience


def _start_state(config, workdir: str, programs: Programs, checkpoints, train_iter):
  """(state, step): resumed from this run's latest checkpoint, else fresh (from init_from)."""
  start = checkpoints.latest_step()
  if start is not None:
    if not checkpoints.has_data_state(start):
      print(f"Checkpoint {start} has no data position for {jax.process_count()} process(es) "
            "(saved with another process count): resuming the model, with the data order "
            "restarted from the seed.")
      train_iter = None
    return checkpoints.restore(start, programs.abstract_state(), train_iter), start
  state = programs.init(jax.random.key(config.train.seed))
  if config.init_from:
    # Parameters from the earlier stage; optimizer state and step start fresh.
    source = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(config.init_from), read_only=True)
    params = source.restore_params(int(config.init_from_step), programs.abstract_state().params)
    state = state.replace(params=params)
  return state, 0


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
          progress: bool = True) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  started = time.perf_counter()
  mesh = mesh or sharding.make_mesh(config.mesh)
  validate(config, mesh)
  t = config.train
  checkpoint_dir = workdir_lib.checkpoint_dir(workdir)
  if config.init_from and ckpt_lib.latest_step(checkpoint_dir) is None:
    workdir_lib.resolve_init_from(config, workdir)  # Checks, copies the tokenizer, pins step.
  tokenizer = workdir_lib.prepare(config, workdir, lambda: datasets.tokenizer_texts(config))
  primary = jax.process_index() == 0
  train_ds, notes = datasets.train_dataset(
      config, tokenizer, batch_size=t.batch_size // jax.process_count(),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  eval_batches, eval_notes = datasets.eval_batches(config, tokenizer)
  for note in notes + eval_notes if primary and progress else ():
    print(note)

  programs = compile_programs(config, mesh)
  train_iter = iter(train_ds)
  checkpoints = ckpt_lib.Checkpoints(checkpoint_dir, max_to_keep=t.max_to_keep)
  writer = metrics_lib.MetricsWriter(workdir, stage=config.stage, primary=primary)
  state, start = _start_state(config, workdir, programs, checkpoints, train_iter)
  writer.truncate_after(start)
  stopper = EarlyStopping(t.patience, [r for r in metrics_lib.read_rows(writer.path)
                                       if r["split"] == "eval"])

  bar = tqdm.tqdm(total=t.steps, initial=start, disable=not (progress and primary),
                  dynamic_ncols=True, mininterval=1.0)
  window, window_start = [], start
  window_time, timed_steps = time.perf_counter(), 0
  last_train, last_eval = {}, None
  last_saved = f"step {start}" if start else "none yet"
  try:
    for step in range(start + 1, t.steps + 1):
      if stopper.should_stop:
        break
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
        last_train = {k: float(np.mean([m[k] for m in window])) for k in window[0]
                      if k not in ("lr", "tokens")}
        last_train["lr"] = float(window[-1]["lr"])
        last_train["tokens_per_sec"] = (t.batch_size * config.data.seq_len
                                        * max(timed_steps, 1) / elapsed)
        writer.write(step, "train", last_train)
        bar.set_postfix(loss=f"{last_train['loss']:.3f}",
                        tok_s=f"{last_train['tokens_per_sec']:.0f}", refresh=False)
        bar.update(step - window_start)
        window, window_start = [], step
        window_time, timed_steps = time.perf_counter(), 0
      eval_loss = None
      if must_eval:
        last_eval = evaluate_lib.evaluate(programs, state.params, eval_batches)
        writer.write(step, "eval", last_eval)
        # A new best is always checkpointed (with its eval loss, so it is kept as the best).
        if stopper.update(last_eval["loss"]):
          eval_loss, must_save = last_eval["loss"], True
        must_save = must_save or stopper.should_stop
        window_time = time.perf_counter()  # Keep eval time out of tokens/s.
      if must_save:
        checkpoints.save(step, state, train_iter, eval_loss=eval_loss)
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
    best = checkpoints.best_step()
    checkpoints.close()
  return TrainResult(state=state, last_train=last_train, last_eval=last_eval, best_step=best,
                     stopped_early=stopper.should_stop, seconds=time.perf_counter() - started)
