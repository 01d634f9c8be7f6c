"""Benchmarks: `python -m gptjax bench KIND`, each printing one JSON object.

  memory  Bytes per device of a config's train step on this machine's devices: parameters,
          optimizer state, batch and the step's temporaries (activations), from the compiled
          step's memory analysis, against the device's memory where it reports one.
  decode  Prefill and decode tokens/s of cached generation at batch 1 and 8, next to the
          limits this machine sets: the decode rate that the forward pass's FLOPs allow at
          the float32 matmul rate measured in the same run, and the one its memory traffic
          (weights plus KV cache read each step) allows at the measured memory bandwidth.
          `ratio` = that roofline / the measured decode rate (1.0 would be perfect).

Timings are the best of `repeats` runs after a warm-up call that compiles: on a shared
machine the best run is the one least disturbed by other work. `recompiles` counts the XLA
compilations during the timed calls (0: the same shapes reuse their programs). New
benchmarks register in BENCHMARKS.
"""

import contextlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import data as data_lib
from gptjax import generate as generate_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import train as train_lib
from gptjax import workdir as workdir_lib


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


def _best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls of fn (which blocks until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
  """Measured float32 [n, n] @ [n, n] rate of the default device, in GFLOP/s."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  return 2 * n**3 / _best_seconds(lambda: matmul(x).block_until_ready(), repeats) / 1e9


def read_gbps(nbytes: int, repeats: int = 10) -> float:
  """Measured rate of reading `nbytes` (a float32 sum over them), in GB/s.

  Sized like the decode step's working set, so it is the bandwidth of whichever level of the
  memory hierarchy that set lives in (on a CPU, L3 cache for small models).
  """
  x = jnp.ones((max(nbytes // 4, 1024),), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return x.nbytes / _best_seconds(lambda: total(x).block_until_ready(), repeats) / 1e9


def decode_flops_per_token(cfg: model_lib.ModelConfig, context: float) -> float:
  """Forward FLOPs to decode one token: 2 per matmul weight, plus attention over `context`."""
  D, F = cfg.d_model, cfg.d_ff
  weights = 4 * D * D + (3 if cfg.mlp == "swiglu" else 2) * D * F  # qkv, out, MLP.
  attention = 2 * 2 * D * context  # q.k and p.v.
  return cfg.num_layers * (2 * weights + attention) + 2 * D * cfg.vocab_size


def _params_bytes(params) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(params))


def decode(generator: generate_lib.Generator, *, batch_sizes=(1, 8), prompt_len: int | None = None,
           new_tokens: int | None = None, repeats: int = 5) -> dict:
  """Prefill and decode throughput of `generator` (greedy, no stop token) per batch size."""
  cfg = generator.model.cfg
  prompt_len = prompt_len or max(1, cfg.max_len // 4)
  new_tokens = new_tokens or max(2, min(cfg.max_len // 2, cfg.max_len - prompt_len))
  if prompt_len + new_tokens > cfg.max_len:
    raise ValueError(f"prompt_len={prompt_len} + new_tokens={new_tokens} exceeds the model's "
                     f"max_len={cfg.max_len}; lower one of them.")
  rate = matmul_gflops()
  sampling = generate_lib.Sampling(max_new_tokens=new_tokens, temperature=0)
  rng = np.random.default_rng(0)
  results = []
  for batch in batch_sizes:
    prompts = rng.integers(16, cfg.vocab_size, size=(batch, prompt_len)).tolist()

    def prefill():
      run = generator.start(prompts, sampling)
      jax.block_until_ready(run.state)
      return run

    def decode_all(run):
      generator.advance(run, new_tokens - 1)  # The first token came with the prefill.
      jax.block_until_ready(run.state)

    decode_all(prefill())  # Compiles both programs.
    with count_compiles() as recompiles:
      prefill_s = _best_seconds(prefill, repeats)
      decode_times = []
      for _ in range(repeats):
        run = prefill()
        start = time.perf_counter()
        decode_all(run)
        decode_times.append(time.perf_counter() - start)
    decode_s = min(decode_times)

    steps = new_tokens - 1
    decode_tps = batch * steps / decode_s
    # Useful work: attention over the mean context of the timed steps.
    flops = decode_flops_per_token(cfg, prompt_len + new_tokens / 2)
    flop_bound = rate * 1e9 / flops
    # Each step reads every weight once and the whole cache (all of its columns).
    capacity = (generate_lib.bucket_length(prompt_len, cfg.max_len)
                + generate_lib.Plan.of(sampling, cfg.max_len, ()).max_new_tokens)
    cache_bytes = 2 * cfg.num_layers * batch * capacity * cfg.d_model * jnp.dtype(
        cfg.compute_dtype).itemsize
    step_bytes = _params_bytes(generator.params) + cache_bytes
    bandwidth = read_gbps(step_bytes)
    memory_bound = batch * bandwidth * 1e9 / step_bytes
    bound = min(flop_bound, memory_bound)
    results.append({
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tokens_per_sec": round(batch * prompt_len / prefill_s, 1),
        "decode_tokens_per_sec": round(decode_tps, 1),
        "decode_ms_per_step": round(1000 * decode_s / steps, 3),
        "flops_per_token": int(flops),
        "flop_bound_tokens_per_sec": round(flop_bound, 1),
        "bytes_per_step": int(step_bytes), "read_gbps": round(bandwidth, 1),
        "memory_bound_tokens_per_sec": round(memory_bound, 1),
        "ratio": round(bound / decode_tps, 2),
        "recompiles": recompiles[0],
    })
  return {
      "benchmark": "decode", "device": str(jax.devices()[0].device_kind),
      "devices": len(jax.devices()),
      "params": int(sum(x.size for x in jax.tree.leaves(generator.params))),
      "matmul_gflops": round(rate, 1),
      "results": results,
  }


def generator_from_config(config: ml_collections.ConfigDict) -> generate_lib.Generator:
  """A Generator with freshly initialised parameters: speed does not depend on training."""
  mesh = sharding.make_mesh(config.mesh)
  programs = train_lib.compile_programs(config, mesh)
  params = programs.init(jax.random.key(config.train.seed)).params
  return generate_lib.Generator(programs.model, params, mesh, programs.rules, stop_ids=())


def run_decode(*, workdir: str | None = None, config: ml_collections.ConfigDict | None = None,
               step: int | str | None = None) -> dict:
  """The decode benchmark on a trained run (`workdir`) or on random weights (`config`)."""
  if workdir:
    generator, _ = generate_lib.load(workdir, step, stop_ids=())  # Decode every token.
  elif config is not None:
    generator = generator_from_config(config)
  else:
    raise ValueError("`bench decode` needs --workdir DIR (a trained run) or --config FILE "
                     "(random weights of that model).")
  return decode(generator)


# name -> fn(*, workdir, config, step) -> dict, printed as one JSON object.
def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def run_memory(*, workdir: str | None = None, config: ml_collections.ConfigDict | None = None,
               step=None) -> dict:
  """Bytes per device of a config's train step on this machine's devices, from the compiled
  step's memory analysis: will the run fit before it is launched?"""
  del step
  if config is None:
    config = workdir_lib.read_config(workdir)
  mesh = sharding.make_mesh(config.mesh)
  train_lib.validate(config, mesh)
  programs = train_lib.compile_programs(config, mesh)
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
      "device": device.device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape),
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


BENCHMARKS = {"decode": run_decode, "memory": run_memory}
