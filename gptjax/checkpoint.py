"""Orbax checkpoints of the train state and the data iterator, saved together.

One `CheckpointManager` step folder holds two items: `state` (params, optimizer state, step)
and `data` (the grain iterator's position), so a resumed run sees exactly the batches an
uninterrupted one would. Orbax writes each step into a temporary folder and renames it only
once complete, so a run killed mid-save leaves the previous checkpoint as the latest.

Kept: the latest `max_to_keep` steps, plus the step with the lowest `eval_loss` among those
saved with metrics (the "best" checkpoint that `--step best` and `init_from_step` pick).
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gptjax.errors import UserError


def _eval_loss(metrics) -> float:
  return metrics["eval_loss"]


class Checkpoints:
  """The checkpoints of one run: `DIR/checkpoints/<step>/{state,data}`."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    keep = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, best_fn=_eval_loss, best_mode="min",
        create=not read_only, read_only=read_only, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the lowest eval loss, or the latest if none was saved with one."""
    best = self.manager.best_step()
    return self.latest_step() if best is None else best

  def resolve(self, step: int | str | None) -> int:
    """A step number from None (latest), "best", "latest" or a number; raises if absent."""
    if step in (None, "latest"):
      found = self.latest_step()
    elif step == "best":
      found = self.best_step()
    else:
      found = int(step) if int(step) in self.all_steps() else None
    if found is None:
      have = ", ".join(map(str, self.all_steps())) or "none"
      raise UserError(f"No checkpoint {step or 'at all'} in {self.directory} (steps: {have}); "
                       "train first or pick one of the saved steps.")
    return found

  def save(self, step: int, state, data_iterator=None, eval_loss: float | None = None):
    """Starts an asynchronous save; the next save or `wait` completes it."""
    items = {"state": ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

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
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def restore_params(self, step: int, abstract_params):
    """Restores only the parameters (no optimizer state), onto `abstract_params`' shardings.

    Used to start a new stage or to serve a model: the optimizer it was trained with need
    not match the one in use now.
    """
    args = _restore_args({"params": abstract_params}, partial=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args)).state["params"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def latest_step(directory: str) -> int | None:
  """The latest complete checkpoint step in `directory`, None if none (creates nothing)."""
  if not os.path.isdir(directory):
    return None
  return Checkpoints(directory, read_only=True).latest_step()


def _restore_args(abstract_tree, partial: bool = False) -> ocp.args.PyTreeRestore:
  # One handler (PyTree) for saving and restoring: a manager refuses to mix handler types.
  return ocp.args.PyTreeRestore(
      item=abstract_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
      partial_restore=partial)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
