"""`bench decode`: prefill and decode tokens/s of cached generation at batch 1 and 8 (or
`--batch_sizes`), next to the limits this machine sets: the decode rate that the forward
pass's FLOPs allow at the matmul rate measured in the same run (in the model's compute
dtype), and the one its memory traffic (weights plus KV cache read each step) allows at the
measured memory bandwidth. `ratio` = that roofline / the measured decode rate (1.0 would be
perfect).

Timings are the best of `repeats` runs after a warm-up call that compiles: on a shared machine
the best run is the one least disturbed by other work. `recompiles` counts the XLA
compilations during the timed calls (0: the same shapes reuse their programs).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import config as config_lib
from gptjax import generate as generate_lib
from gptjax import steps as steps_lib
from gptjax.bench import flops as flops_lib
from gptjax.bench import hf_generate
from gptjax.bench import probes
from gptjax.errors import UserError


def _weights_read_per_step(generator: generate_lib.Generator) -> int:
  """Bytes of the weights one decode step reads: every parameter but the tables it only
  looks rows up in (the token embedding when it is not also the output head, and the
  position embedding)."""
  lookups = {"pos_embedding"} | (set() if generator.model.cfg.tie_embeddings else {"embedding"})
  return sum(x.nbytes for name, tree in generator.params.items() if name not in lookups
             for x in jax.tree.leaves(tree))


def _model_params(generator: generate_lib.Generator) -> int:
  """The model's parameter count (not counting the generator's copy of a tied head)."""
  return sum(x.size for name, tree in generator.params.items()
             if not (generator.head_copy and name == "head") for x in jax.tree.leaves(tree))


def decode(generator: generate_lib.Generator, *, batch_sizes=(1, 8), prompt_len: int | None = None,
           new_tokens: int | None = None, repeats: int = 5, torch: str = "off") -> dict:
  """Prefill and decode throughput of `generator` (greedy, no stop token) per batch size.

  `torch`: "auto" also times transformers' generate on the same model and weights
  (gptjax/bench/hf_generate.py) where torch and transformers are installed; "on" insists.
  """
  cfg = generator.model.cfg
  prompt_len = prompt_len or max(1, cfg.max_len // 4)
  new_tokens = new_tokens or max(2, min(cfg.max_len // 2, cfg.max_len - prompt_len))
  if prompt_len + new_tokens > cfg.max_len:
    raise UserError(f"prompt_len={prompt_len} + new_tokens={new_tokens} exceeds the model's "
                     f"max_len={cfg.max_len}; lower one of them.")
  # The peer first, in a subprocess, before this process times anything.
  peer = None if torch == "off" else hf_generate.peer(generator, batch_sizes, prompt_len,
                                                      new_tokens)
  if torch == "on" and "skipped" in peer:
    raise UserError(f"--torch=on, but {peer['skipped']}.")
  peer_rates = {r["batch"]: r["decode_tokens_per_sec"] for r in (peer or {}).get("results", [])}
  # The compute dtype's rate: a bf16 model on a GPU runs its matmuls on the bf16 tensor cores,
  # twice the float32 (TF32) rate. Accelerators need larger matmuls than a CPU to reach it.
  on_cpu = jax.devices()[0].platform == "cpu"
  rate = probes.matmul_gflops(1024 if on_cpu else 4096, dtype=cfg.compute_dtype)
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
    with probes.count_compiles() as recompiles:
      prefill_s = probes.best_seconds(prefill, repeats)
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
    flops = flops_lib.decode_flops_per_token(cfg, prompt_len + new_tokens / 2)
    flop_bound = rate * 1e9 / flops
    # Each step reads every weight matrix once and the whole cache (all of its columns).
    capacity = (generate_lib.bucket_length(prompt_len, cfg.max_len)
                + generate_lib.Plan.of(sampling, cfg.max_len, ()).max_new_tokens)
    cache_bytes = 2 * cfg.num_layers * batch * capacity * cfg.d_model * jnp.dtype(
        cfg.compute_dtype).itemsize
    step_bytes = _weights_read_per_step(generator) + cache_bytes
    bandwidth = probes.memory_gbps(step_bytes)
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
    if batch in peer_rates:
      results[-1].update(hf_generate_decode_tokens_per_sec=peer_rates[batch],
                         ratio_to_hf=round(decode_tps / peer_rates[batch], 2))
  return {
      "benchmark": "decode", "device": str(jax.devices()[0].device_kind),
      "devices": len(jax.devices()),
      "params": _model_params(generator),
      "matmul_gflops": round(rate, 1),
      "results": results,
      **({} if peer is None else {"hf_generate": {k: v for k, v in peer.items()
                                                  if k != "results"}}),
  }



def generator_from_config(config: config_lib.StageConfig) -> generate_lib.Generator:
  """A Generator with freshly initialised parameters: speed does not depend on training."""
  programs = steps_lib.programs_for(config)
  params = programs.init(jax.random.key(config.train.seed)).params
  return generate_lib.Generator(programs.model, params, programs.mesh, programs.rules,
                                stop_ids=())


def run(*, workdir: str | None = None, config: config_lib.StageConfig | None = None,
        step: int | str | None = None, batch_sizes=(1, 8), torch: str = "auto",
        **unused_flags) -> dict:
  """The decode benchmark on a trained run (`workdir`) or on random weights (`config`)."""
  if workdir:
    generator, _ = generate_lib.load(workdir, step, stop_ids=())  # Decode every token.
  elif config is not None:
    generator = generator_from_config(config)
  else:
    raise UserError("`bench decode` needs --workdir DIR (a trained run) or --config FILE "
                     "(random weights of that model).")
  return decode(generator, batch_sizes=batch_sizes, torch=torch)


