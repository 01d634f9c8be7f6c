"""`bench train`: tokens/s of a config's train step (the median of `--steps` timed steps, each
synchronised with the device), the compile time of the first step, and model FLOPs
utilisation (MFU): FLOPs per token (gptjax/bench/flops.py) times tokens/s, against the matmul
rate measured in the same run (same dtype, same devices) and against the datasheet peak of
known accelerators; and the floor under the step time: its weight matmuls (forward, input and
weight gradients) timed alone, at the step's shapes. On the CPU, with PyTorch installed, it
also times the same step in PyTorch eager (gptjax/bench/torch_gpt.py, in a subprocess),
before and after its own steps, and reports the ratio to their mean, and the ratio the floor
allows. `load_average` (1 minute, at its start and end) says how busy the machine was: trust
CPU timings that start well below the core count.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import host
from gptjax import metrics as metrics_lib
from gptjax import sharding
from gptjax import model as model_lib
from gptjax import steps as steps_lib
from gptjax import train as train_loop
from gptjax.bench import flops as flops_lib
from gptjax.bench import probes
from gptjax.errors import UserError


# Synchronised and back-to-back steps alternate in rounds of this many steps.
ROUND = 5


def step_time_stats(name: str, seconds: list[float]) -> dict:
  """{name: median, name_p90, name_min, name_max} of step times, in milliseconds."""
  ms = np.asarray(seconds) * 1000
  return {name: round(float(np.median(ms)), 2),
          f"{name}_p90": round(float(np.percentile(ms, 90)), 2),
          f"{name}_min": round(float(ms.min()), 2), f"{name}_max": round(float(ms.max()), 2)}


def gc_stats(pauses: list[tuple[int, float]]) -> dict:
  """Python's garbage collections during the timed steps: how many of each generation, their
  total and longest pause in milliseconds."""
  return {"gc_collections": [sum(g == gen for g, _ in pauses) for gen in range(3)],
          "gc_ms_total": round(1000 * sum(s for _, s in pauses), 2),
          "gc_ms_max": round(1000 * max((s for _, s in pauses), default=0.0), 2)}


def _mark() -> tuple[float, dict]:
  return time.perf_counter(), probes.cpu_seconds()


def _step_record(start: tuple[float, dict], end: tuple[float, dict]) -> dict:
  """One step's wall seconds and its CPU-time deltas (probes.cpu_seconds) between two marks."""
  return {"wall": end[0] - start[0], **{k: v - start[1][k] for k, v in end[1].items()}}


def slow_steps(*kinds: list[dict], over: float = 1.1) -> dict:
  """Steps slower than `over` x their kind's median wall time beside the others: how many,
  and per step on average the wall time, this process's CPU time (and its part in the
  kernel), the other processes' CPU time (machine busy - own) and the hypervisor's steal, in
  milliseconds. A slow step with the typical own CPU time and more steal or others' time
  waited for the cores; one with more own CPU time did more work (or ran slower)."""
  groups = {"slow": [], "typical": []}
  for records in kinds:
    median = float(np.median([r["wall"] for r in records]))
    for r in records:
      groups["slow" if r["wall"] > over * median else "typical"].append(r)

  def summary(records):
    ms = lambda key: round(1000 * float(np.mean([r[key] for r in records])), 1)
    out = {"count": len(records)}
    if records:
      out.update(wall_ms=ms("wall"), own_cpu_ms=ms("own"), own_system_ms=ms("own_system"))
      if "busy" in records[0]:
        out["others_cpu_ms"] = round(1000 * float(np.mean(
            [r["busy"] - r["own"] for r in records])), 1)
        out["steal_ms"] = ms("steal")
    return out

  return {"over_median": over, **{k: summary(v) for k, v in groups.items()}}


def random_batch(config: config_lib.StageConfig, rows: int, seed: int = 0) -> dict:
  """`rows` rows of uniformly random tokens, one document a row: speed ignores the text."""
  length, vocab = config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(seed).integers(0, vocab, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
          "weights": np.ones((rows, length), np.float32)}


def torch_reference(config: config_lib.StageConfig, steps: int) -> dict:
  """Tokens/s of the PyTorch reference step at `config`'s shape, or {"skipped": why}."""
  m = config.model
  gpt2_style = dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=False,
                    tie_embeddings=True, dtype="float32", dropout=0.0)
  different = [f"model.{k}={getattr(m, k)!r}" for k, v in gpt2_style.items()
               if getattr(m, k) != v]
  if different:
    return {"skipped": "the PyTorch reference is a float32 GPT-2 style model only, not "
                       + ", ".join(different)}
  if jax.process_count() > 1 or jax.devices()[0].platform != "cpu":
    return {"skipped": "the PyTorch reference runs on one CPU host only"}
  args = dict(vocab=m.vocab_size, layers=m.num_layers, heads=m.num_heads, d_model=m.d_model,
              d_ff=m.d_ff, seq_len=config.data.seq_len, batch=config.train.batch_size,
              steps=steps)
  # A subprocess: PyTorch's OpenMP threads never compete with XLA's for the cores.
  out = subprocess.run([sys.executable, "-m", "gptjax.bench.torch_gpt"]
                       + [f"--{k}={v}" for k, v in args.items()],
                       capture_output=True, text=True, timeout=3600, check=False)
  if out.returncode:
    return {"skipped": f"gptjax.bench.torch_gpt failed: {out.stderr.strip()[-300:]}"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _torch_or_skip(config: config_lib.StageConfig, steps: int, required: bool) -> dict:
  try:
    import torch as _  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    reference = torch_reference(config, steps)
  except ImportError:
    reference = {"skipped": "torch is not installed (pip install -e .[bench])"}
  if required and "skipped" in reference:
    raise UserError(f"--torch=on, but {reference['skipped']}.")
  return reference


def bf16_twin(config: config_lib.StageConfig, batch: dict):
  """(a synchronised bfloat16-compute step's seconds, as a function; its first loss) for a
  float32 model on one CPU host, else None: the same model and batch, parameters and
  optimizer state still float32, its matmuls in bfloat16, to time in the same run."""
  if (config.model.dtype != "float32" or config.lora.rank or jax.process_count() > 1
      or jax.devices()[0].platform != "cpu"):
    return None
  twin = config.replace(model={"dtype": "bfloat16"})
  programs = steps_lib.programs_for(twin)
  state = programs.init(jax.random.key(config.train.seed))
  batch = sharding.global_batch(batch, programs.batch_sharding)

  state, metrics = programs.train_step(state, batch)  # Compiles it.
  first_loss = float(metrics["loss"])

  def seconds() -> float:
    nonlocal state
    start = time.perf_counter()
    state, metrics = programs.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start

  return seconds, first_loss


def train(config: config_lib.StageConfig, *, steps: int = 20, warmup: int = 2,
          torch: str = "auto", compare_bf16: bool = True) -> dict:
  """Throughput and MFU of `config`'s train step on random tokens (see the module docstring).

  `torch`: "auto" also times the PyTorch reference when torch is installed and the reference
  applies (CPU, GPT-2 style, float32); "on" insists on it; "off" skips it. `compare_bf16`:
  on the CPU, also time the same step computing in bfloat16 (`bf16_twin`).
  """
  load_start = os.getloadavg()[0]
  # The PyTorch step first, before this process runs anything on XLA, so the two never share
  # the cores; and again after, so a drift of the machine's speed during the run shows.
  reference = None if torch == "off" else _torch_or_skip(config, steps, required=torch == "on")
  cfg = config.model
  programs = steps_lib.programs_for(config)
  base = None
  if config.lora.rank:  # A LoRA step's frozen base: random weights time the same.
    plain = steps_lib.compile_programs(config.replace(lora={"rank": 0}), programs.mesh)
    base = plain.init(jax.random.key(config.train.seed)).params
    programs = programs.with_base(base)
  state = programs.init(jax.random.key(config.train.seed))
  t = config.train
  host_batch = random_batch(config, t.batch_size // jax.process_count(),
                            seed=jax.process_index())
  batch = sharding.global_batch(host_batch, programs.batch_sharding)
  twin = bf16_twin(config, host_batch) if compare_bf16 else None

  def run_step():
    nonlocal state
    state, metrics = programs.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return metrics

  def loop_steps(count: int) -> tuple[list[dict], float]:
    """`count` steps dispatched back to back, as the train loop runs them: (a record of each
    interval between their completions, see _step_record; the seconds from the first
    dispatch to the last completion). Each step is waited for only once the next one is
    dispatched, so the device never waits for the host, and the intervals are the loop's
    own step times."""
    nonlocal state
    start = done = _mark()
    intervals, previous = [], None
    for _ in range(count):
      state, metrics = programs.train_step(state, batch)
      if previous is not None:
        jax.block_until_ready(previous)
        intervals.append(_step_record(done, now := _mark()))
        done = now
      previous = metrics
    jax.block_until_ready((state, metrics))
    intervals.append(_step_record(done, end := _mark()))
    return intervals, end[0] - start[0]

  start = time.perf_counter()
  first_loss = float(run_step()["loss"])
  compile_s = time.perf_counter() - start  # Tracing, compiling and running the first step.
  for _ in range(warmup):
    run_step()
  sync_records, loop_records, loop_s, bf16_times = [], [], 0.0, []
  # Synchronised and back-to-back steps alternate in rounds, so a drift of the machine's
  # speed during the run (other work starting or stopping) falls on both alike.
  rounds = [min(ROUND, steps - i) for i in range(0, steps, ROUND)]
  # The train loop's treatment of Python's garbage collector (see train_loop.SteadyCollector),
  # collecting between rounds, untimed.
  events_before = probes.memory_events()
  with (train_loop.SteadyCollector() as collector, probes.count_compiles() as recompiles,
        probes.gc_pauses() as gc_pauses):
    for count in rounds:
      collector.collect(0, log_step=True)
      for _ in range(count):
        start = _mark()
        run_step()
        sync_records.append(_step_record(start, _mark()))
      intervals, seconds = loop_steps(count)
      loop_records += intervals
      loop_s += seconds
      bf16_times += [twin[0]() for _ in range(count)] if twin else []
  times = [r["wall"] for r in sync_records]
  loop_times = [r["wall"] for r in loop_records]
  # Per timed step (synchronised, back-to-back and bf16 ones alike).
  timed_steps = len(times) + len(loop_times) + len(bf16_times)
  memory_events = {k: round((v - events_before[k]) / timed_steps, 1)
                   for k, v in probes.memory_events().items()}
  step_s = statistics.median(times)
  loop_s /= steps

  tokens = t.batch_size * config.data.seq_len
  tokens_per_sec = tokens / step_s
  flops = flops_lib.train_flops_per_token(cfg, state.params, config.data.seq_len, frozen=base)
  devices = programs.mesh.devices.flatten()
  platform = devices[0].platform
  # Accelerators need large matmuls to reach their peak; 1024 is enough for a CPU. Each
  # process measures its own devices (hosts are assumed alike).
  local = [d for d in devices if d.process_index == jax.process_index()]
  rate = jax.process_count() * probes.matmul_gflops(1024 if platform == "cpu" else 8192,
                                             dtype=cfg.compute_dtype, devices=local)
  if twin:
    bf16_rate = probes.matmul_gflops(1024, dtype="bfloat16", devices=local)
    bf16_s = statistics.median(bf16_times)
    bf16 = {"step_ms": round(1000 * bf16_s, 2), "step_ms_ratio": round(bf16_s / step_s, 4),
            "first_loss": round(twin[1], 4), "matmul_gflops": round(bf16_rate, 1),
            "matmul_ratio": round(bf16_rate / rate, 4)}
  peak = probes.peak_gflops(devices[0].device_kind, cfg.compute_dtype)
  peak = None if peak is None else peak * len(devices)
  matmuls_s = probes.weight_matmul_seconds(cfg, tokens // jax.process_count(), local)
  achieved = {k: flops[f"flops_per_token{k}"] * tokens_per_sec / 1e9 for k in ("", "_causal")}
  result = {
      "benchmark": "train", "device": str(devices[0].device_kind), "devices": len(devices),
      "platform": platform, "dtype": cfg.dtype, "batch_size": t.batch_size,
      "seq_len": config.data.seq_len, "tokens_per_step": tokens,
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))), **flops,
      "attention": model_lib.attention_implementation(cfg),
      "compile_s": round(compile_s, 2), "steps": steps,
      **step_time_stats("step_ms", times), **step_time_stats("loop_step_ms", loop_times),
      "tokens_per_sec": round(tokens_per_sec, 1),
      "loop_tokens_per_sec": round(tokens / loop_s, 1),
      "loop_ratio": round(step_s / loop_s, 4),
      # The same comparison without the outliers' weight on one side only: means of both.
      "loop_ratio_of_means": round(statistics.mean(times) / loop_s, 4),
      "slow_steps": slow_steps(sync_records, loop_records),
      **gc_stats(gc_pauses), "memory_events_per_step": memory_events,
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
  if twin:
    result["bf16"] = bf16
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


def logged_rate(workdir: str, skip: int = 1) -> dict:
  """The tokens/s that a `gptjax train` run logged in its metrics.jsonl (train rows, after the
  first `skip` logging windows of warm-up): to compare with `loop_tokens_per_sec` of the same
  config, which the loop should reach with its data pipeline, logging and checkpoints."""
  path = os.path.join(workdir, "metrics.jsonl")
  rates = [r["tokens_per_sec"] for r in metrics_lib.read_rows(path)
           if r.get("split") == "train" and "tokens_per_sec" in r][skip:]
  if not rates:
    raise UserError(f"{path} has no train rows after the first {skip}: train longer (more "
                    "than train.log_every steps) or pass a workdir that `gptjax train` wrote.")
  return {"benchmark": "train_logged", "workdir": workdir, "windows": len(rates),
          "skipped_windows": skip, "tokens_per_sec": round(statistics.median(rates), 1),
          "tokens_per_sec_min": round(min(rates), 1),
          "tokens_per_sec_max": round(max(rates), 1)}


def run(*, workdir: str | None = None, config: config_lib.StageConfig | None = None,
        step=None, steps: int = 20, torch: str = "auto", bf16: str = "auto",
        **unused_flags) -> dict:
  """The train benchmark of --config (a fresh model on random tokens), or the rate a trained
  --workdir logged. `bf16` "off" skips the bfloat16 twin (see `train`)."""
  del step
  if workdir and config is None:
    return logged_rate(workdir)
  if config is None or workdir:
    raise UserError("`bench train` needs --config FILE (e.g. experiments/bench_cpu.py) to "
                     "time a fresh model on random tokens, or --workdir DIR alone to read the "
                     "rate a `gptjax train` run logged.")
  return train(config, steps=steps, torch=torch, compare_bf16=bf16 != "off")
