"""`bench memory`: bytes per device of a config's train step on this machine's devices:
parameters, optimizer state, batch and the step's temporaries (activations), from the
compiled step's memory analysis, against the device's memory where it reports one.
"""

import time

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import steps as steps_lib
from gptjax import workdir as workdir_lib


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def run(*, workdir: str | None = None, config: config_lib.StageConfig | None = None,
        step=None, **unused_flags) -> dict:
  """Bytes per device of a config's train step on this machine's devices, from the compiled
  step's memory analysis: will the run fit before it is launched?"""
  del step
  if config is None:
    config = workdir_lib.read_config(workdir)
  programs = steps_lib.programs_for(config)
  state = programs.abstract_state()
  keys = dict(data_lib.ROW_DTYPES)
  if config.data.kind == "dialogue":
    keys["assistant"] = np.float32
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=programs.batch_sharding)
           for k, dtype in keys.items()}
  start = time.perf_counter()
  analysis = programs.train_step.lower(state, batch).compile().memory_analysis()
  compile_seconds = time.perf_counter() - start
  # The state is donated: its outputs reuse its input buffers (the aliased bytes).
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  device = jax.devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")  # None on the CPU.
  return {
      "device": device.device_kind, "devices": jax.device_count(),
      "mesh": dict(programs.mesh.shape),
      "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
      "param_bytes_per_device": _bytes_per_device(state.params),
      "optimizer_bytes_per_device": _bytes_per_device(state.opt_state),
      "batch_bytes_per_device": _bytes_per_device(batch),
      "activation_bytes_per_device": int(analysis.temp_size_in_bytes),
      "total_bytes_per_device": int(total),
      "device_bytes_limit": limit,
      "fits": None if limit is None else bool(total <= limit),
      "compile_seconds": compile_seconds,
  }


# ----------------------------------------------------------------------------- train

