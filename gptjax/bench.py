"""Benchmarks: `python -m gptjax bench KIND`, each printing one JSON object.

  memory  Bytes per device of a config's train step on this machine's devices: parameters,
          optimizer state, batch and the step's temporaries (activations), from the compiled
          step's memory analysis, against the device's memory where it reports one.
  decode  Prefill and decode tokens/s of cached generation at batch 1 and 8, next to the
          limits this machine sets: the decode rate that the forward pass's FLOPs allow at
          the float32 matmul rate measured in the same run, and the one its memory traffic
          (weights plus KV cache read each step) allows at the measured memory bandwidth.
          `ratio` = that roofline / the measured decode rate (1.0 would be perfect).

  train   Tokens/s of a config's train step (the median of `--steps` timed steps, each
          synchronised with the device), the compile time of the first step, and model FLOPs
          utilisation (MFU): FLOPs per token times tokens/s, against the matmul rate measured
          in the same run (same dtype, same devices) and against the datasheet peak of known
          accelerators; and the floor under the step time: its weight matmuls (forward,
          input and weight gradients) timed alone, at the step's shapes. On the CPU, with
          PyTorch installed, it also times the same step in PyTorch eager
          (benchmarks/torch_gpt.py), before and after its own steps, and reports the ratio to
          their mean, and the ratio the floor allows.

Decode timings are the best of `repeats` runs after a warm-up call that compiles: on a shared
machine the best run is the one least disturbed by other work. `recompiles` counts the XLA
compilations during the timed calls (0: the same shapes reuse their programs). The train
benchmark's `load_average` (1 minute, at its start and end) says how busy the machine was:
trust CPU timings that start well below the core count. New benchmarks register in
BENCHMARKS.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6N for the forward and
backward matmuls of the N parameters (position embeddings excluded: they are added, not
multiplied) plus 12 * layers * heads * head_dim * seq_len for attention, which counts the
whole L x L score matrix; the `_causal` variants count the half that causal attention needs.
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from gptjax import data as data_lib
from gptjax import generate as generate_lib
from gptjax import host
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import train as train_lib
from gptjax import workdir as workdir_lib

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


def _best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls of fn (which blocks until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _rows_and_replicated(devices):
  """Shardings over `devices`: rows split between them, and a copy on each."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  return jax.sharding.NamedSharding(mesh, P("d")), jax.sharding.NamedSharding(mesh, P())


def matmul_gflops(n: int = 1024, repeats: int = 10, dtype=jnp.float32, devices=None) -> float:
  """Measured [n, n] @ [n, n] rate in GFLOP/s, of the default device or summed over `devices`.

  With several devices each multiplies its own [n, n] block at once, as data parallelism
  does, so devices that share hardware (the CPU devices of one host) share the rate.
  """
  devices = list(devices or jax.devices()[:1])
  blocks, replicated = _rows_and_replicated(devices)
  x = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices) * n, n), dtype), blocks)
  w = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), replicated)
  seconds = _compiled_best_seconds(lambda a, b: a @ b, x, w, repeats=repeats,
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
  read = x.nbytes / _compiled_best_seconds(jnp.sum, x, repeats=repeats)
  read_write = 2 * x.nbytes / _compiled_best_seconds(lambda v: v * 2, x, repeats=repeats)
  return max(read, read_write) / 1e9


def _compiled_best_seconds(fn, *args, repeats: int, **jit_kwargs) -> float:
  """The fastest of `repeats` calls of jax.jit(fn, **jit_kwargs)(*args), after one that
  compiles it."""
  program = jax.jit(fn, **jit_kwargs)
  jax.block_until_ready(program(*args))
  return _best_seconds(lambda: jax.block_until_ready(program(*args)), repeats)


def weight_matmul_shapes(cfg: model_lib.ModelConfig) -> list[tuple[int, int]]:
  """(inputs, outputs) of each matmul with a weight in the forward pass: every layer's fused
  qkv, attention output and MLP projections, then the output head."""
  D, F = cfg.d_model, cfg.d_ff
  mlp = [(D, F), (D, F), (F, D)] if cfg.mlp == "swiglu" else [(D, F), (F, D)]
  return [(D, 3 * D), (D, D), *mlp] * cfg.num_layers + [(D, cfg.vocab_size)]


def weight_matmul_seconds(cfg: model_lib.ModelConfig, rows: int, devices, repeats: int = 3,
                          max_rows: int = 16384) -> float:
  """Seconds that a train step's weight matmuls take alone: the floor under its step time.

  Each weight [in, out] of `weight_matmul_shapes` makes three GEMMs over the step's `rows`
  tokens: the forward [R, in] @ [in, out], the input gradient [R, out] @ [in, out]^T and the
  weight gradient [R, in]^T @ [R, out], at the compute dtype, in one program. The rows are
  split over `devices`, each multiplying its own share (data parallelism, no collectives).
  A device's share above `max_rows` is timed at `max_rows` and scaled (a GEMM that large
  takes time in proportion to its rows), so the operands stay a few GB at GPT-2 small's
  262K-token steps.
  """
  devices = list(devices)
  rows_sharding, replicated = _rows_and_replicated(devices)
  share = max(rows // len(devices), 1)
  per_device = min(share, max_rows)
  shapes = weight_matmul_shapes(cfg)
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
  seconds = _compiled_best_seconds(program, inputs, grads, weights, repeats=repeats)
  return seconds * share / per_device


def decode_flops_per_token(cfg: model_lib.ModelConfig, context: float) -> float:
  """Forward FLOPs to decode one token: 2 per matmul weight, plus attention over `context`."""
  weights = sum(n_in * n_out for n_in, n_out in weight_matmul_shapes(cfg))
  attention = 2 * 2 * cfg.d_model * context  # q.k and p.v.
  return 2 * weights + cfg.num_layers * attention


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
    bandwidth = memory_gbps(step_bytes)
    memory_bound = batch * bandwidth * 1e9 / step_bytes
    bound = min(flop_bound, memory_bound)
    results.append({
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tokens_per_sec": round(batch * prompt_len / prefill_s, 1),
        "decode_tokens_per_sec": round(decode_tps, 1),
        "decode_ms_per_step": round(1000 * decode_s / steps, 3),
        "flops_per_token": int(flops),
        "flop_bound_tokens_per_sec": round(flop_bound, 1),
        "bytes_per_step": int(step_bytes), "memory_gbps": round(bandwidth, 1),
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


def programs_for(config: ml_collections.ConfigDict) -> train_lib.Programs:
  """`config`'s programs on a mesh of this machine's devices, once the config is checked."""
  mesh = sharding.make_mesh(config.mesh)
  train_lib.validate(config, mesh)
  return train_lib.compile_programs(config, mesh)


def generator_from_config(config: ml_collections.ConfigDict) -> generate_lib.Generator:
  """A Generator with freshly initialised parameters: speed does not depend on training."""
  programs = programs_for(config)
  params = programs.init(jax.random.key(config.train.seed)).params
  return generate_lib.Generator(programs.model, params, programs.mesh, programs.rules,
                                stop_ids=())


def run_decode(*, workdir: str | None = None, config: ml_collections.ConfigDict | None = None,
               step: int | str | None = None, **unused_flags) -> dict:
  """The decode benchmark on a trained run (`workdir`) or on random weights (`config`)."""
  if workdir:
    generator, _ = generate_lib.load(workdir, step, stop_ids=())  # Decode every token.
  elif config is not None:
    generator = generator_from_config(config)
  else:
    raise ValueError("`bench decode` needs --workdir DIR (a trained run) or --config FILE "
                     "(random weights of that model).")
  return decode(generator)


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def run_memory(*, workdir: str | None = None, config: ml_collections.ConfigDict | None = None,
               step=None, **unused_flags) -> dict:
  """Bytes per device of a config's train step on this machine's devices, from the compiled
  step's memory analysis: will the run fit before it is launched?"""
  del step
  if config is None:
    config = workdir_lib.read_config(workdir)
  programs = programs_for(config)
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


def train_flops_per_token(cfg: model_lib.ModelConfig, params, seq_len: int) -> dict:
  """PaLM's model FLOPs per token of a train step (see the module docstring)."""
  n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
          if all(getattr(k, "key", None) != "pos_embedding" for k in path))
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return {"params_counted": int(n), "flops_per_token": int(6 * n + attention),
          "flops_per_token_causal": int(6 * n + attention // 2)}


def peak_gflops(device_kind: str, dtype) -> float | None:
  """Datasheet peak of one device at `dtype` in GFLOP/s; None where it is not known."""
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in device_kind:
      peak = bf16 if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else f32
      return None if peak is None else peak * 1e3
  return None


def random_batch(config: ml_collections.ConfigDict, rows: int, seed: int = 0) -> dict:
  """`rows` rows of uniformly random tokens, one document a row: speed ignores the text."""
  length, vocab = config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(seed).integers(0, vocab, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
          "weights": np.ones((rows, length), np.float32)}


def torch_script() -> str:
  """Path of the PyTorch reference step, beside the package in a checkout."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "torch_gpt.py")


def torch_reference(config: ml_collections.ConfigDict, steps: int) -> dict:
  """Tokens/s of benchmarks/torch_gpt.py at `config`'s shape, or {"skipped": why}."""
  m = config.model
  gpt2_style = dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=False,
                    tie_embeddings=True, dtype="float32", dropout=0.0)
  different = [f"model.{k}={m[k]!r}" for k, v in gpt2_style.items() if m[k] != v]
  if different:
    return {"skipped": "the PyTorch reference is a float32 GPT-2 style model only, not "
                       + ", ".join(different)}
  if jax.process_count() > 1 or jax.devices()[0].platform != "cpu":
    return {"skipped": "the PyTorch reference runs on one CPU host only"}
  if not os.path.exists(torch_script()):
    return {"skipped": f"{torch_script()} is missing (run from a gptjax checkout)"}
  args = dict(vocab=m.vocab_size, layers=m.num_layers, heads=m.num_heads, d_model=m.d_model,
              d_ff=m.d_ff, seq_len=config.data.seq_len, batch=config.train.batch_size,
              steps=steps)
  # A subprocess: PyTorch's OpenMP threads never compete with XLA's for the cores.
  out = subprocess.run([sys.executable, torch_script()]
                       + [f"--{k}={v}" for k, v in args.items()],
                       capture_output=True, text=True, timeout=3600, check=False)
  if out.returncode:
    return {"skipped": f"benchmarks/torch_gpt.py failed: {out.stderr.strip()[-300:]}"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _torch_or_skip(config: ml_collections.ConfigDict, steps: int, required: bool) -> dict:
  try:
    import torch as _  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    reference = torch_reference(config, steps)
  except ImportError:
    reference = {"skipped": "torch is not installed (pip install -e .[bench])"}
  if required and "skipped" in reference:
    raise ValueError(f"--torch=on, but {reference['skipped']}.")
  return reference


def train(config: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 2,
          torch: str = "auto") -> dict:
  """Throughput and MFU of `config`'s train step on random tokens (see the module docstring).

  `torch`: "auto" also times the PyTorch reference when torch is installed and the reference
  applies (CPU, GPT-2 style, float32); "on" insists on it; "off" skips it.
  """
  load_start = os.getloadavg()[0]
  # The PyTorch step first, before this process runs anything on XLA, so the two never share
  # the cores; and again after, so a drift of the machine's speed during the run shows.
  reference = None if torch == "off" else _torch_or_skip(config, steps, required=torch == "on")
  cfg = train_lib.model_config(config)
  programs = programs_for(config)
  state = programs.init(jax.random.key(config.train.seed))
  t = config.train
  batch = train_lib.global_batch(
      random_batch(config, t.batch_size // jax.process_count(), seed=jax.process_index()),
      programs.batch_sharding)

  def run_step():
    nonlocal state
    state, metrics = programs.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return metrics

  start = time.perf_counter()
  first_loss = float(run_step()["loss"])
  compile_s = time.perf_counter() - start  # Tracing, compiling and running the first step.
  for _ in range(warmup):
    run_step()
  with count_compiles() as recompiles:
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      run_step()
      times.append(time.perf_counter() - start)
    # The same steps dispatched back to back, as the train loop runs them, synchronised once.
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = programs.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    loop_s = (time.perf_counter() - start) / steps
  step_s = statistics.median(times)

  tokens = t.batch_size * config.data.seq_len
  tokens_per_sec = tokens / step_s
  flops = train_flops_per_token(cfg, state.params, config.data.seq_len)
  devices = programs.mesh.devices.flatten()
  platform = devices[0].platform
  # Accelerators need large matmuls to reach their peak; 1024 is enough for a CPU. Each
  # process measures its own devices (hosts are assumed alike).
  local = [d for d in devices if d.process_index == jax.process_index()]
  rate = jax.process_count() * matmul_gflops(1024 if platform == "cpu" else 8192,
                                             dtype=cfg.compute_dtype, devices=local)
  peak = peak_gflops(devices[0].device_kind, cfg.compute_dtype)
  peak = None if peak is None else peak * len(devices)
  matmuls_s = weight_matmul_seconds(cfg, tokens // jax.process_count(), local)
  achieved = {k: flops[f"flops_per_token{k}"] * tokens_per_sec / 1e9 for k in ("", "_causal")}
  result = {
      "benchmark": "train", "device": str(devices[0].device_kind), "devices": len(devices),
      "platform": platform, "dtype": cfg.dtype, "batch_size": t.batch_size,
      "seq_len": config.data.seq_len, "tokens_per_step": tokens,
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))), **flops,
      "attention": model_lib.attention_implementation(cfg),
      "compile_s": round(compile_s, 2), "steps": steps,
      "step_ms": round(1000 * step_s, 2), "step_ms_min": round(1000 * min(times), 2),
      "step_ms_max": round(1000 * max(times), 2),
      "tokens_per_sec": round(tokens_per_sec, 1),
      "loop_tokens_per_sec": round(tokens / loop_s, 1),
      "achieved_gflops": round(achieved[""], 1),
      "achieved_gflops_causal": round(achieved["_causal"], 1),
      "matmul_gflops": round(rate, 1),
      "mfu_vs_matmul": round(achieved[""] / rate, 4),
      "mfu_vs_matmul_causal": round(achieved["_causal"] / rate, 4),
      "weight_matmul_ms": round(1000 * matmuls_s, 2),
      "weight_matmul_share": round(matmuls_s / step_s, 4),
      "peak_gflops": peak,
      "mfu_vs_peak": None if peak is None else round(achieved[""] / peak, 4),
      "mfu_vs_peak_causal": None if peak is None else round(achieved["_causal"] / peak, 4),
      "first_loss": round(first_loss, 4), "recompiles": recompiles[0],
      **host.describe(),
  }
  if reference is not None and "tokens_per_sec" in reference:
    after = _torch_or_skip(config, steps, required=torch == "on")
    runs = [reference["tokens_per_sec"]]
    if "tokens_per_sec" in after:
      runs.append(after["tokens_per_sec"])
    mean = statistics.mean(runs)
    # Its MFU on the same FLOP count and matmul rate: ratio_to_torch is the MFUs' ratio.
    reference.update(tokens_per_sec_runs=runs, tokens_per_sec=round(mean, 1),
                     step_ms=round(1000 * tokens / mean, 2),
                     mfu_vs_matmul_causal=round(
                         flops["flops_per_token_causal"] * mean / 1e9 / rate, 4))
  if reference is not None:
    result["torch"] = reference
    if "tokens_per_sec" in reference:
      result["ratio_to_torch"] = round(tokens_per_sec / reference["tokens_per_sec"], 3)
      # The ratio if everything but the weight matmuls took no time.
      result["ratio_to_torch_ceiling"] = round(reference["step_ms"] / 1000 / matmuls_s, 3)
  result["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
  return result


def run_train(*, workdir: str | None = None, config: ml_collections.ConfigDict | None = None,
              step=None, steps: int = 20, torch: str = "auto") -> dict:
  """The train benchmark of --config (a fresh model on random tokens)."""
  del step
  if config is None or workdir:
    raise ValueError("`bench train` needs --config FILE (e.g. experiments/bench_cpu.py), not "
                     "--workdir: it times a fresh model on random tokens.")
  return train(config, steps=steps, torch=torch)


# name -> fn(*, workdir, config, step, steps, torch) -> dict, printed as one JSON object;
# `steps` and `torch` are the train benchmark's flags, which the others ignore.
BENCHMARKS = {"decode": run_decode, "memory": run_memory, "train": run_train}
