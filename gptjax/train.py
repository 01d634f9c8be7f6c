"""The train loop every stage shares: resume, log, evaluate, checkpoint, stop early.

The steps themselves are in gptjax/steps.py; this file feeds them batches and keeps the
workdir (gptjax/workdir.py) up to date.
"""

import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from gptjax import checkpoint as ckpt_lib
from gptjax import classify as classify_lib
from gptjax import config as config_lib
from gptjax import datasets
from gptjax import evaluate as evaluate_lib
from gptjax import lora as lora_lib
from gptjax import metrics as metrics_lib
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax import workdir as workdir_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before saving the bad state."""


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped training after a step whose checkpoint is saved and complete."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_status(self) -> int:
    return 128 + self.signum  # The shell's convention: 143 for SIGTERM, 130 for SIGINT.


class StopSignals:
  """Notes SIGTERM and SIGINT during training so the loop stops after the step in flight.

  A preemption (a TPU VM's maintenance event, SLURM's time limit) sends SIGTERM and waits a
  grace period before killing; Ctrl-C sends SIGINT. Either one is only recorded here: the loop
  finishes its step, saves that step's checkpoint, waits for it and raises `Interrupted`. A
  second signal during the save is reported and otherwise ignored, so it cannot tear the
  checkpoint. In a multi-process run JAX's preemption service owns SIGTERM: it agrees on one
  step across processes (`reached_preemption_sync_point`), so every process saves the same
  step; SIGINT is turned into SIGTERM to take the same path.
  """

  def __init__(self):
    self.signum = None
    self.multiprocess = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers.
      for signum in (signal.SIGTERM, signal.SIGINT):
        if not (self.multiprocess and signum == signal.SIGTERM):
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signum is None:
      self.signum = signum
      print(f"\ngptjax: {name}: finishing the step in flight and saving its checkpoint; a "
            "second signal will not interrupt the save.", file=sys.stderr, flush=True)
      if self.multiprocess:
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service agrees on a step.
    else:
      print(f"gptjax: {name} again: still saving the checkpoint; it stops when that is "
            "complete.", file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step` (every process gets the same answer for the same step)."""
    if self.multiprocess:
      reached = multihost_utils.reached_preemption_sync_point(step)
      if reached and self.signum is None:
        self.signum = signal.SIGTERM
      return reached
    return self.signum is not None


class TimedSaves:
  """`train.save_every_minutes`: a checkpoint at the first logging step that many minutes after
  the last save (process 0's clock decides, so every process saves the same step)."""

  def __init__(self, minutes: float):
    self.seconds = minutes * 60
    self.last = time.monotonic()

  def due(self) -> bool:
    if not self.seconds:
      return False
    due = time.monotonic() - self.last >= self.seconds
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    return due

  def saved(self):
    self.last = time.monotonic()


class SteadyCollector:
  """Keeps Python's garbage collector from stalling steps at random.

  The collector runs whenever allocations outnumber frees by 700, on whichever line allocates:
  in the train loop that is the dispatching thread, every few steps. Every tenth young
  collection is a middle one, and now and then a full one walks every tracked object: ~200K
  once jax, orbax and grain are imported and the programs compiled, a 430 ms pause measured on
  a 2-core VM (200 steps of a small model logged 52 young, 5 middle and 1 full collection),
  most of a reference step (experiments/bench_cpu.py) stalled at random. So the loop turns
  automatic collection off and collects where the host has time (`collect`): at a logging step,
  after the step is dispatched and before its metrics are waited for. Each collection freezes
  what survives it (modules, compiled programs, the state: almost all permanent), so the next
  one walks only the objects made since. Refcounting still frees frozen objects; only a
  reference cycle among them waits for the collector, which exiting restores as it was.
  """

  EVERY = 100  # Steps between collections at most, whatever train.log_every is.

  def __init__(self):
    self.was_enabled = gc.isenabled()

  def __enter__(self):
    gc.disable()
    self._collect()
    return self

  def __exit__(self, *exc):
    gc.unfreeze()
    if self.was_enabled:
      gc.enable()

  def collect(self, step: int, log_step: bool):
    if log_step or step % self.EVERY == 0:
      self._collect()

  @staticmethod
  def _collect():
    gc.collect()
    gc.freeze()


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
  state: steps_lib.TrainState
  last_train: dict  # Mean train metrics of the last logging window.
  last_eval: dict | None  # Metrics of the last evaluation.
  best_step: int | None = None  # Checkpoint with the best train.early_stop_metric.
  stopped_early: bool = False
  seconds: float = 0.0  # Wall time of this call.


def _check_finite(window: list[dict], first_step: int):
  # A finite loss with non-finite gradients still poisons the parameters, so check both.
  for i, m in enumerate(window):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      raise NonFiniteLossError(f"Loss is {float(m['loss'])} (gradient norm "
                               f"{float(m['grad_norm'])}) at step {first_step + i + 1}")


class EarlyStopping:
  """Counts evaluations since the best value of train.early_stop_metric; rebuilt from
  metrics.jsonl on resume. `objective` is the metric signed so that lower is better."""

  def __init__(self, patience: int, metric: str, eval_rows: list[dict]):
    self.patience, self.metric, self.sign = patience, metric, config_lib.metric_sign(metric)
    self.best, self.since = math.inf, 0
    for row in eval_rows:
      if metric in row:  # Rows written under another early_stop_metric may lack it.
        self.update(row)

  def objective(self, metrics: dict) -> float:
    return self.sign * metrics[self.metric]

  def update(self, metrics: dict) -> bool:
    """Records an evaluation's metrics; True if its metric is the best so far."""
    value = self.objective(metrics)
    improved = value < self.best
    self.best, self.since = (value, 0) if improved else (self.best, self.since + 1)
    return improved

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.since >= self.patience


def _start_state(stage: workdir_lib.Stage, programs: steps_lib.Programs, checkpoints, train_iter):
  """(state, step): resumed from this run's latest checkpoint, else fresh (from its init)."""
  latest = checkpoints.latest_step()
  if latest is not None:
    if not checkpoints.has_data_state(latest):
      print(f"Checkpoint {latest} has no data position for {jax.process_count()} process(es) "
            "(saved with another process count): resuming the model, with the data order "
            "restarted from the seed.")
      train_iter = None
    # The newest checkpoint that restores; damaged newer ones are reported and set aside.
    return checkpoints.restore_latest(programs.abstract_state(), train_iter)
  state = programs.init(jax.random.key(stage.config.train.seed))
  if stage.init and not stage.config.lora.rank:  # A LoRA stage's init_from is its frozen base.
    # Parameters from the earlier stage; optimizer state and step start fresh.
    # A new classification head (not in the source) keeps its fresh initialisation.
    abstract = {k: v for k, v in programs.abstract_state().params.items()
                if k != classify_lib.HEAD}
    with ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(stage.init.workdir),
                              read_only=True) as source:
      params = source.restore_params(stage.init.step, abstract)
    state = state.replace(params={**state.params, **params})
  return state, 0


def train(stage: workdir_lib.Stage, *, mesh=None, progress: bool = True) -> TrainResult:
  """Trains a resolved stage (`workdir.resolve`), resuming from its latest checkpoint if
  there is one."""
  started = time.perf_counter()
  config, workdir = stage.config, stage.workdir
  mesh = mesh or sharding.make_mesh(config.mesh.sizes)  # Checks the mesh against the devices.
  steps_lib.validate(config, mesh)
  lock = workdir_lib.Lock(workdir)
  lock.acquire()  # Before any work: a workdir in use is refused at once.
  try:
    return _train(stage, mesh, progress, lock, started)
  finally:
    lock.release()


def _datasets(config, tokenizer):
  """(train dataset, eval batches, notes): reading them is the last check before writing."""
  train_ds, notes = datasets.train_dataset(
      config, tokenizer, batch_size=config.train.batch_size // jax.process_count(),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  eval_batches, eval_notes = datasets.eval_batches(config, tokenizer)
  return train_ds, eval_batches, notes + eval_notes


def _train(stage, mesh, progress, lock, started) -> TrainResult:
  config, workdir, t = stage.config, stage.workdir, stage.config.train
  checkpoint_dir = workdir_lib.checkpoint_dir(workdir)
  read = {}
  # Every dataset is read before the workdir is written (on process 0, in `prepare`), so a
  # missing split or an unusable file leaves the workdir as it was.
  tokenizer = workdir_lib.prepare(stage, lambda: datasets.tokenizer_texts(config),
                                  before_writing=lambda tok: read.update(d=_datasets(config, tok)))
  lock.acquire()  # The workdir exists now.
  primary = jax.process_index() == 0
  train_ds, eval_batches, notes = read.get("d") or _datasets(config, tokenizer)
  for note in notes if primary and progress else ():
    print(note)

  programs = steps_lib.compile_programs(config, mesh)
  if config.lora.rank:
    programs = programs.with_base(lora_lib.load_base(config, workdir, programs.abstract_base))
  train_iter = iter(train_ds)
  checkpoints = ckpt_lib.Checkpoints(checkpoint_dir, max_to_keep=t.max_to_keep)
  writer = metrics_lib.MetricsWriter(workdir, stage=config.stage, primary=primary)
  state, start = _start_state(stage, programs, checkpoints, train_iter)
  writer.truncate_after(start)
  stopper = EarlyStopping(t.patience, t.early_stop_metric,
                          [r for r in metrics_lib.read_rows(writer.path) if r["split"] == "eval"])

  bar = tqdm.tqdm(total=t.steps, initial=start, disable=not (progress and primary),
                  dynamic_ncols=True, mininterval=1.0)
  window, window_start = [], start
  window_time, timed_steps = time.perf_counter(), 0
  last_train, last_eval = {}, None
  last_saved = f"step {start}" if start else "none yet"
  step, signals, timed = start, StopSignals(), TimedSaves(t.save_every_minutes)
  collector = SteadyCollector()
  try:
    signals.__enter__()
    collector.__enter__()
    for step in range(start + 1, t.steps + 1):
      if stopper.should_stop:
        break
      batch = sharding.global_batch(next(train_iter), programs.batch_sharding)
      state, metrics = programs.train_step(state, batch)
      stop = signals.should_stop(step)
      window.append(metrics)  # Device arrays: no host sync until the window is logged.
      timed_steps += 1
      if step == start + 1 and step % t.log_every:
        collector.collect(step, log_step=True)  # Freezes what compiling made, untimed.
        # Keep compilation out of tokens/s: time the window from the first step's end.
        jax.block_until_ready(metrics)
        window_time, timed_steps = time.perf_counter(), 0
      is_last = step == t.steps
      must_save = (is_last or stop or step % t.checkpoint_every == 0
                   or (step % t.log_every == 0 and timed.due()))
      must_eval = bool(eval_batches) and (is_last or (t.eval_every and step % t.eval_every == 0))
      log_step = must_save or must_eval or step % t.log_every == 0
      collector.collect(step, log_step)  # While the device runs the step just dispatched.
      # Metrics are checked before any eval or save, so a bad state is never saved.
      if log_step:
        window = jax.device_get(window)
        _check_finite(window, window_start)
        elapsed = time.perf_counter() - window_time
        last_train = {k: float(np.mean([m[k] for m in window])) for k in window[0]
                      if k != "lr"}
        last_train["lr"] = float(window[-1]["lr"])
        last_train["tokens_per_sec"] = (t.batch_size * config.data.seq_len
                                        * max(timed_steps, 1) / elapsed)
        writer.write(step, "train", last_train)
        bar.set_postfix(loss=f"{last_train['loss']:.3f}",
                        tok_s=f"{last_train['tokens_per_sec']:.0f}", refresh=False)
        bar.update(step - window_start)
        window, window_start = [], step
        window_time, timed_steps = time.perf_counter(), 0
      objective = None
      if must_eval:
        last_eval = evaluate_lib.evaluate(programs, state.params, eval_batches)
        writer.write(step, "eval", last_eval)
        # A new best is always checkpointed (with its objective, so it is kept as the best).
        if stopper.update(last_eval):
          objective, must_save = stopper.objective(last_eval), True
        must_save = must_save or stopper.should_stop
        window_time = time.perf_counter()  # Keep eval time out of tokens/s.
      if must_save:
        checkpoints.save(step, state, train_iter, objective=objective)
        last_saved = f"step {step}"
        timed.saved()
      if stop:
        break
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
    checkpoints.close()  # Waits for a save in flight: a signal never leaves half a checkpoint.
    signals.__exit__()
    collector.__exit__()
  if signals.signum is not None:
    raise Interrupted(
        f"{signal.Signals(signals.signum).name} stopped {config.stage} after step {step}; its "
        f"checkpoint in {checkpoints.directory} is complete. Rerun the same command to resume "
        f"from step {step}.", signals.signum)
  return TrainResult(state=state, last_train=last_train, last_eval=last_eval, best_step=best,
                     stopped_early=stopper.should_stop, seconds=time.perf_counter() - started)
