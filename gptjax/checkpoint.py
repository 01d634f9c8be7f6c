"""Orbax checkpoints of the train state and the data iterator, saved together.

One `CheckpointManager` step folder holds two items: `state` (params, optimizer state, step)
and `data` (the grain iterator's position), so a resumed run sees exactly the batches an
uninterrupted one would. Orbax writes each step into a temporary folder and renames it only
once complete, so a run killed mid-save leaves the previous checkpoint as the latest.

Kept: the latest `max_to_keep` steps, plus the best step among those saved with metrics (the
"best" checkpoint that `--step best` and `init_from_step` pick): the lowest `objective`, the
stage's train.early_stop_metric signed so that lower is better (checkpoints written before
that key existed carry `eval_loss` instead).

Damage (a disk error, a copy cut short, a crash outside Orbax's rename) is told apart from a
bug: a step whose metadata is missing or unreadable, or whose restore fails, is "damaged".
The latest step resolves to the newest undamaged one (saying which were skipped); a step
named explicitly that is damaged is an error naming it and why. A resumed run falls back to
the newest step that restores, and moves the damaged ones newer than it to
`DIR/checkpoints.damaged/<step>` (never deleted), so its own saves of those steps go through.
"""

import contextlib
import json
import os
import re
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gptjax.errors import UserError


def _objective(metrics) -> float:
  return metrics["objective"] if "objective" in metrics else metrics["eval_loss"]


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


# How a failed write reads in OSError, TensorStore and Orbax messages.
_WRITE_FAILURES = re.compile(r"No space left|RESOURCE_EXHAUSTED|Permission denied|Read-only file "
                             r"system|Disk quota exceeded|os_error_code='(28|13|30|122)'")


class DamagedCheckpointError(UserError):
  """A checkpoint step on disk cannot be read."""

  def __init__(self, message: str, step: int, why: str):
    super().__init__(message)
    self.step, self.why = step, why


# Files every complete step has; JSON ones are parsed (a truncated JSON file fails to).
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")
_JSON = ("_CHECKPOINT_METADATA", "state/_METADATA")


def _first_line(error: BaseException, limit: int = 300) -> str:
  """The error's type and first line, for a one-line message: TensorStore's errors end that
  line with their whole JSON spec (several KB), which is cut, and so is anything past
  `limit` characters."""
  text = str(error).strip().splitlines()
  if not text:
    return type(error).__name__
  line = text[0].split(" [tensorstore_spec=")[0]
  line = line if len(line) <= limit else line[:limit - 3] + "..."
  return f"{type(error).__name__}: {line}"


class Checkpoints:
  """The checkpoints of one run: `DIR/checkpoints/<step>/{state,data}`."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    keep = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(get_metric_fn=_objective, reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, best_fn=_objective, best_mode="min",
        create=not read_only, read_only=read_only, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending, self._failed = None, False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def damage(self, step: int) -> str | None:
    """Why step `step` cannot be restored, judged from its files without reading the arrays
    (a restore finds the rest); None if it looks complete."""
    folder = os.path.join(self.directory, str(step))
    for name in _REQUIRED:
      if not os.path.isfile(os.path.join(folder, name)):
        return f"{name} is missing"
    data = os.path.join(folder, "data")
    names = [*_JSON, *(f"data/{n}" for n in (os.listdir(data) if os.path.isdir(data) else ())
                       if n.endswith(".json"))]
    for name in names:
      try:
        with open(os.path.join(folder, name)) as f:
          json.load(f)
      except (OSError, ValueError) as e:
        return f"{name} is unreadable ({_first_line(e)})"
    return None

  def _damaged(self, step: int, why: str) -> DamagedCheckpointError:
    others = ", ".join(str(s) for s in self.all_steps() if s != step) or "none"
    return DamagedCheckpointError(
        f"Checkpoint {step} in {self.directory} is damaged: {why}. It is left as it is; pass "
        f"--step with another saved step (others: {others}) or restore the folder from a copy.",
        step, why)

  def _intact_latest(self) -> int | None:
    """The newest step that looks complete; warns about each damaged one it skips."""
    for step in sorted(self.all_steps(), reverse=True):
      why = self.damage(step)
      if why is None:
        return step
      _warn(f"checkpoint {step} in {self.directory} is damaged ({why}); skipping it.")
    return None

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the lowest objective, or the latest if none was saved with one."""
    best = self.manager.best_step()
    return self.latest_step() if best is None else best

  def resolve(self, step: int | str | None) -> int:
    """A step number from None (latest), "best", "latest" or a number; raises if absent."""
    if step in (None, "latest"):
      found = self._intact_latest()
      if found is None and self.all_steps():
        raise self._damaged(self.latest_step(), "every saved step is damaged")
    elif step == "best":
      found = self.best_step()
    else:
      found = int(step) if int(step) in self.all_steps() else None
    if found is not None and (why := self.damage(found)):
      raise self._damaged(found, why)
    if found is None:
      have = ", ".join(map(str, self.all_steps())) or "none"
      raise UserError(f"No checkpoint {step or 'at all'} in {self.directory} (steps: {have}); "
                       "train first or pick one of the saved steps.")
    return found

  def save(self, step: int, state, data_iterator=None, objective: float | None = None):
    """Starts an asynchronous save; the next save or `wait` completes it. A step saved with an
    `objective` (lower is better) is a candidate for the best."""
    items = {"state": ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None if objective is None else {"objective": float(objective)}
    with self._writing():  # The previous save's failure surfaces here.
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    self._pending = step

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed write (disk full, no permission) into a CheckpointWriteError."""
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      if isinstance(e, UserError) or not _WRITE_FAILURES.search(str(e)):
        raise
      self._failed = True
      kept = ", ".join(str(s) for s in self.all_steps()) or "none"
      raise CheckpointWriteError(
          f"Could not write checkpoint {self._pending} to {self.directory} "
          f"({_first_line(e)}); the earlier checkpoints (steps: {kept}) are intact. Free disk "
          "space or fix the folder's permissions, then rerun to resume.") from None

  def has_data_state(self, step: int) -> bool:
    """Whether `step` holds a data-iterator position for this process layout (grain saves
    one file per process, so a run resumed on another process count has none)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.exists(os.path.join(self.directory, str(step), "data", name))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings of `abstract_state` (and the iterator in place)."""
    items = {"state": _restore_args(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._restore(step, items).state

  def restore_latest(self, abstract_state, data_iterator=None):
    """(state, step) of the newest step that restores, or None if no step does. Damaged
    newer steps are moved to `checkpoints.damaged/` (the run will save those steps again)."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        if why := self.damage(step):
          raise self._damaged(step, why)
        state = self.restore(step, abstract_state, data_iterator)
      except DamagedCheckpointError as e:
        _warn(f"checkpoint {step} in {self.directory} is damaged ({e.why}); falling back to "
              "the previous one.")
        damaged.append(step)
        continue
      self._set_aside(damaged)
      return state, step
    if damaged:
      raise self._damaged(damaged[0], "no saved step restores (all are damaged)")
    return None

  def load(self, step: int | str | None, restore):
    """(restore(n), n) for checkpoint `step` as `resolve` names it; for None or "latest", the
    newest step that restores: a damaged one (only a restore can tell arrays cut short) is
    named in a warning and skipped, never moved or deleted. For readers (eval, sample, serve)."""
    if step not in (None, "latest"):
      found = self.resolve(step)
      return restore(found), found
    for found in sorted(self.all_steps(), reverse=True):
      if why := self.damage(found):
        _warn(f"checkpoint {found} in {self.directory} is damaged ({why}); skipping it.")
        continue
      try:
        return restore(found), found
      except DamagedCheckpointError as e:
        _warn(f"checkpoint {found} in {self.directory} is damaged ({e.why}); using the "
              "previous one.")
    return restore(self.resolve(step)), None  # Raises, naming what is missing or damaged.

  def _set_aside(self, steps: list[int]):
    if not steps or jax.process_index() != 0:
      return
    aside = self.directory + ".damaged"
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, str(step))
      while os.path.exists(target):
        target += "_"
      shutil.move(os.path.join(self.directory, str(step)), target)
      _warn(f"moved damaged checkpoint {step} to {target} (kept, not deleted).")
    self.manager.reload()

  def _restore(self, step: int, items: dict):
    _quiet_closed_loop_callbacks()
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
      # A bad file reads as any of these, from Orbax, TensorStore or grain. Not a UserError
      # that something upstream raised on purpose: those keep their own message.
      if isinstance(e, UserError):
        raise
      raise self._damaged(step, f"restoring it failed ({_first_line(e)})") from e

  def restore_params(self, step: int, abstract_params):
    """Restores only the parameters (no optimizer state), onto `abstract_params`' shardings.

    Used to start a new stage or to serve a model: the optimizer it was trained with need
    not match the one in use now.
    """
    args = _restore_args({"params": abstract_params}, partial=True)
    return self._restore(step, {"state": args}).state["params"]

  def wait(self):
    with self._writing():
      self.manager.wait_until_finished()

  def close(self):
    """Waits for a save in flight and releases the manager (also on leaving a `with` block)."""
    reported = self._failed  # A failure already raised is not raised twice.
    try:
      with self._writing():
        self.manager.close()
    except CheckpointWriteError:
      if not reported:
        raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _quiet_closed_loop_callbacks():
  """Drops the 'Event loop is closed' tracebacks of a failed restore: TensorStore completes the
  reads still in flight into the event loop Orbax closed when the first one failed, and
  Python prints each of those callbacks' errors; the restore's own error says it all."""
  previous = sys.unraisablehook
  if getattr(previous, "gptjax_quiet", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and "Event loop is closed" in str(error)):
      previous(unraisable)

  hook.gptjax_quiet = True
  sys.unraisablehook = hook


def _warn(line: str):
  if jax.process_index() == 0:
    print(f"gptjax: warning: {line}", file=sys.stderr, flush=True)


def resolve_step(directory: str, step: int | str | None) -> int:
  """Checkpoints.resolve on `directory`, opened read-only and closed again (creates nothing)."""
  with Checkpoints(directory, read_only=True) as checkpoints:
    return checkpoints.resolve(step)


def latest_step(directory: str) -> int | None:
  """The latest complete checkpoint step in `directory`, None if none (creates nothing)."""
  if not os.path.isdir(directory):
    return None
  with Checkpoints(directory, read_only=True) as checkpoints:
    return checkpoints.latest_step()


def _restore_args(abstract_tree, partial: bool = False) -> ocp.args.PyTreeRestore:
  # One handler (PyTree) for saving and restoring: a manager refuses to mix handler types.
  return ocp.args.PyTreeRestore(
      item=abstract_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
      partial_restore=partial)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
