"""Measurements of the machine that the benchmarks compare against: matmul rate, memory
bandwidth, the floor a train step's weight matmuls set, datasheet peaks, and counting
compilations and timing calls.
"""

import contextlib
import gc
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gptjax import model as model_lib
from gptjax.bench import flops as flops_lib

# Dense datasheet peaks per chip, TFLOP/s: (device_kind contains, bfloat16, float32). float32
# is JAX's default matmul precision for float32 inputs: TF32 tensor cores on NVIDIA GPUs; TPUs
# run it as bfloat16 passes and have no float32 datasheet figure. The first match wins, so
# the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756, 378),
    ("H100", 989, 495),  # SXM, device_kind "NVIDIA H100 80GB HBM3".
    ("H200", 989, 495),
    ("A100", 312, 156),
    ("TPU v4", 275, None),
    ("TPU v5 lite", 197, None),  # v5e.
    ("TPU v5e", 197, None),
    ("TPU v5p", 459, None),
    ("TPU v5", 459, None),  # v5p reports "TPU v5".
)


@contextlib.contextmanager
def count_compiles():
  """Counts the XLA compilations started inside the block: yields a list holding the count."""
  count = [0]

  def listener(event: str, duration: float, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def gc_pauses():
  """Times Python's garbage collections inside the block: yields a list of (generation,
  seconds), one a collection. A collection stops the dispatching thread; a full one walks
  every tracked object (millions once jax and its dependencies are imported)."""
  pauses, started = [], []

  def callback(phase: str, info: dict):
    if phase == "start":
      started.append(time.perf_counter())
    elif started:
      pauses.append((info["generation"], time.perf_counter() - started.pop()))

  gc.callbacks.append(callback)
  try:
    yield pauses
  finally:
    gc.callbacks.remove(callback)


def memory_events() -> dict:
  """Counters of the memory events that can stall a step: this process's page faults (minor:
  a page mapped afresh; major: read from disk), and, machine-wide on Linux, the times a
  huge-page allocation stalled to compact memory or fell back to small pages."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  events = {"minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt}
  try:
    with open("/proc/vmstat") as f:
      vmstat = dict(line.split() for line in f)
  except OSError:
    return events
  for name in ("compact_stall", "thp_fault_fallback"):
    if name in vmstat:
      events[name] = int(vmstat[name])
  return events


def cpu_seconds() -> dict:
  """CPU time so far, in seconds: this process's (`own`: user + system, all threads;
  `own_system`: the part spent in the kernel, e.g. mapping and zeroing pages) and,
  machine-wide on Linux, the time the cores were busy (`busy`: any process, the kernel's
  interrupts included) and the time the hypervisor gave them to another guest (`steal`).
  Differences over a step say whether it shared the cores: busy - own is the other
  processes' share; steal is time the step's threads were ready but not running."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  seconds = {"own": usage.ru_utime + usage.ru_stime, "own_system": usage.ru_stime}
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return seconds
  user, nice, system, _, _, irq, softirq, steal = fields
  hz = os.sysconf("SC_CLK_TCK")
  seconds.update(busy=(user + nice + system + irq + softirq) / hz, steal=steal / hz)
  return seconds


def best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls of fn (which blocks until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def rows_and_replicated(devices):
  """Shardings over `devices`: rows split between them, and a copy on each."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  return jax.sharding.NamedSharding(mesh, P("d")), jax.sharding.NamedSharding(mesh, P())


def matmul_gflops(n: int = 1024, repeats: int = 10, dtype=jnp.float32, devices=None) -> float:
  """Measured [n, n] @ [n, n] rate in GFLOP/s, of the default device or summed over `devices`.

  With several devices each multiplies its own [n, n] block at once, as data parallelism
  does, so devices that share hardware (the CPU devices of one host) share the rate.
  """
  devices = list(devices or jax.devices()[:1])
  blocks, replicated = rows_and_replicated(devices)
  x = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices) * n, n), dtype), blocks)
  w = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), replicated)
  seconds = compiled_best_seconds(lambda a, b: a @ b, x, w, repeats=repeats,
                                   out_shardings=blocks)
  return 2 * len(devices) * n**3 / seconds / 1e9


def memory_gbps(nbytes: int, repeats: int = 50) -> float:
  """Measured memory bandwidth over a working set of `nbytes`, in GB/s.

  The better of two streams over it: a float32 sum (reads it) and a scaling (reads and
  writes it). Which one runs at the memory's speed depends on the backend and its flags: with
  XLA:CPU's own kernels (`host.xla_cpu_flags`) the sum is compute-bound at a third of the
  bandwidth the scaling reaches. Sized like the decode step's working set, so it is the
  bandwidth of whichever level of the memory hierarchy that set lives in (on a CPU, L3 cache
  for small models).
  """
  x = jnp.ones((max(nbytes // 4, 1024),), jnp.float32)
  read = x.nbytes / compiled_best_seconds(jnp.sum, x, repeats=repeats)
  read_write = 2 * x.nbytes / compiled_best_seconds(lambda v: v * 2, x, repeats=repeats)
  return max(read, read_write) / 1e9


def compiled_best_seconds(fn, *args, repeats: int, **jit_kwargs) -> float:
  """The fastest of `repeats` calls of jax.jit(fn, **jit_kwargs)(*args), after one that
  compiles it."""
  program = jax.jit(fn, **jit_kwargs)
  jax.block_until_ready(program(*args))
  return best_seconds(lambda: jax.block_until_ready(program(*args)), repeats)




def weight_matmul_seconds(cfg: model_lib.ModelConfig, rows: int, devices, repeats: int = 3,
                          max_rows: int = 16384) -> float:
  """Seconds that a train step's weight matmuls take alone: the floor under its step time.

  Each weight [in, out] of `flops.weight_matmul_shapes` makes three GEMMs over the step's `rows`
  tokens: the forward [R, in] @ [in, out], the input gradient [R, out] @ [in, out]^T and the
  weight gradient [R, in]^T @ [R, out], at the compute dtype, in one program. The rows are
  split over `devices`, each multiplying its own share (data parallelism, no collectives).
  A device's share above `max_rows` is timed at `max_rows` and scaled (a GEMM that large
  takes time in proportion to its rows), so the operands stay a few GB at GPT-2 small's
  262K-token steps.
  """
  devices = list(devices)
  rows_sharding, replicated = rows_and_replicated(devices)
  share = max(rows // len(devices), 1)
  per_device = min(share, max_rows)
  shapes = flops_lib.weight_matmul_shapes(cfg)
  keys = jax.random.split(jax.random.key(0), 3)

  def init(key, i, shape):
    return jax.random.normal(jax.random.fold_in(key, i), shape, cfg.compute_dtype)

  # Inputs [R, in] are shared by the weights of one width; each weight gets its own output
  # gradient [R, out], so that no two GEMMs are alike (XLA would compute those once).
  total = len(devices) * per_device
  inputs = {n: init(keys[0], n, (total, n)) for n in {n_in for n_in, _ in shapes}}
  grads = [init(keys[1], i, (total, n_out)) for i, (_, n_out) in enumerate(shapes)]
  weights = [init(keys[2], i, shape) for i, shape in enumerate(shapes)]

  def gemms(inputs, grads, weights):
    out = []
    for dy_RO, w_IO in zip(grads, weights):
      x_RI = inputs[w_IO.shape[0]]
      out += [x_RI @ w_IO, dy_RO @ w_IO.T, x_RI.T @ dy_RO]
    return out

  program = jax.shard_map(gemms, mesh=rows_sharding.mesh, in_specs=(P("d"), P("d"), P()),
                          out_specs=P("d"))
  inputs, grads = jax.device_put((inputs, grads), rows_sharding)
  weights = jax.device_put(weights, replicated)
  seconds = compiled_best_seconds(program, inputs, grads, weights, repeats=repeats)
  return seconds * share / per_device




def peak_gflops(device_kind: str, dtype) -> float | None:
  """Datasheet peak of one device at `dtype` in GFLOP/s; None where it is not known."""
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in device_kind:
      peak = bf16 if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else f32
      return None if peak is None else peak * 1e3
  return None

