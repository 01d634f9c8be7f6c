"""Orbax checkpoints of the train state and the data iterator, saved together.

One `CheckpointManager` step folder holds two items: `state` (params, optimizer state, step)
and `data` (the grain iterator's position), so a resumed run sees exactly the batches an
uninterrupted one would. Orbax writes each step into a temporary folder and renames it only
once complete, so a run killed mid-save leaves the previous checkpoint as the latest.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """The checkpoints of one run: `DIR/checkpoints/<step>/{state,data}`."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None):
    """Starts an asynchronous save; the next save or `wait` completes it."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings of `abstract_state` (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
