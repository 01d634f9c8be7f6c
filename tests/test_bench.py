"""The train benchmark: FLOP counts, datasheet peaks, its JSON report, the PyTorch reference."""

import gc
import importlib.util
import json
import time

import jax
import flax.linen as nn
import jax.numpy as jnp
import pytest
from conftest import TINY_EXPERIMENT, gptjax, tiny_config

from gptjax.bench import decode as bench_decode
from gptjax.bench import flops as flops_lib
from gptjax.bench import hf_generate
from gptjax.bench import probes
from gptjax.bench import train as bench_train
from gptjax import config as config_lib
from gptjax import generate as generate_lib
from gptjax import model as model_lib
from gptjax import steps as steps_lib
from gptjax.errors import UserError



def _params(cfg):
  return jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                        jnp.zeros((1, cfg.max_len), jnp.int32))["params"]


def test_flops_per_token_follow_palm():
  cfg = model_lib.ModelConfig(vocab_size=100, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                              max_len=16)
  flops = flops_lib.train_flops_per_token(cfg, _params(cfg), seq_len=16)
  # A layer: qkv 32x96, out 32x32, MLP 2x32x64, two norm scales; the tied embedding 100x32
  # and the final norm. Position embeddings (16x32) are added, not multiplied: not counted.
  n = 2 * (32 * 96 + 32 * 32 + 2 * 32 * 64 + 2 * 32) + 100 * 32 + 32
  assert flops["params_counted"] == n
  assert flops["flops_per_token"] == 6 * n + 12 * 2 * 4 * 8 * 16  # 12 L H Q T.
  # A LoRA step: the frozen base runs forward and input gradients (4 FLOPs a parameter),
  # the adapters train (6).
  adapters = {"a": jnp.zeros((32, 8))}
  lora = flops_lib.train_flops_per_token(cfg, adapters, seq_len=16, frozen=_params(cfg))
  assert lora["frozen_params_counted"] == n and lora["params_counted"] == 32 * 8
  assert lora["flops_per_token"] == 6 * 32 * 8 + 4 * n + 12 * 2 * 4 * 8 * 16
  assert flops["flops_per_token_causal"] == 6 * n + 6 * 2 * 4 * 8 * 16


@pytest.mark.parametrize("mlp, tie", [("gelu", True), ("swiglu", False)])
def test_weight_matmuls_are_the_models_matmul_weights(mlp, tie):
  cfg = model_lib.ModelConfig(vocab_size=100, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                              max_len=16, mlp=mlp, tie_embeddings=tie)
  # Every 2-D (or more) parameter but the looked-up tables: the tied embedding is the head.
  looked_up = ("pos_embedding",) if tie else ("pos_embedding", "embedding")
  params = nn.meta.unbox(_params(cfg))
  weights = [x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
             if x.ndim > 1 and path[-1].key not in looked_up]
  shapes = flops_lib.weight_matmul_shapes(cfg)
  assert sorted(n_in * n_out for n_in, n_out in shapes) == sorted(weights)
  assert all(32 in shape for shape in shapes)  # Each maps to or from d_model.


def test_decode_flops_count_each_weight_twice_and_attention_over_the_context():
  cfg = model_lib.ModelConfig(vocab_size=100, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                              max_len=16)
  per_layer = 32 * 96 + 32 * 32 + 2 * 32 * 64  # qkv, out, MLP.
  assert flops_lib.decode_flops_per_token(cfg, context=10) == (
      2 * (2 * per_layer + 32 * 100) + 2 * 2 * 2 * 32 * 10)


def test_weight_matmul_floor_runs_three_separate_gemms_per_weight(monkeypatch):
  cfg = model_lib.ModelConfig(vocab_size=100, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                              max_len=16)
  assert probes.weight_matmul_seconds(cfg, rows=64, devices=jax.devices()[:2], repeats=1) > 0
  programs = []
  monkeypatch.setattr(probes, "compiled_best_seconds",
                      lambda fn, *args, repeats: programs.append((fn, args)) or 1.0)
  probes.weight_matmul_seconds(cfg, rows=64, devices=jax.devices()[:1])
  # Above max_rows a device times max_rows of them and scales: 1 s for 32 rows is 2 s for 64.
  assert probes.weight_matmul_seconds(cfg, rows=64, devices=jax.devices()[:1], max_rows=32) == 2
  assert programs[1][1][0][32].shape == (32, 32)  # The [R, d_model] inputs, R capped.
  fn, args = programs[0]
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  # The layers' weight gradients have the same shapes: XLA must not merge them into one.
  assert hlo.count(" dot(") == 3 * len(flops_lib.weight_matmul_shapes(cfg))


def test_every_datasheet_peak_is_reachable_and_picks_the_dtype():
  # The first matching name wins: a general name listed before a specific one would shadow it.
  for name, bf16, f32 in probes.PEAK_TFLOPS:
    kind = f"NVIDIA {name} 80GB" if "TPU" not in name else name
    assert probes.peak_gflops(kind, "bfloat16") == bf16 * 1e3, name
    assert probes.peak_gflops(kind, "float32") == (None if f32 is None else f32 * 1e3), name
  assert probes.peak_gflops("NVIDIA H100 PCIe", "bfloat16") < probes.peak_gflops(
      "NVIDIA H100 80GB HBM3", "bfloat16")
  assert probes.peak_gflops("cpu", "float32") is None


def test_matmul_rate_of_one_device_and_of_several():
  assert probes.matmul_gflops(n=128, repeats=2) > 0
  assert probes.matmul_gflops(n=128, repeats=2, dtype=jnp.bfloat16, devices=jax.devices()[:2]) > 0


def test_train_benchmark_reports_throughput_and_mfu():
  report = bench_train.train(config_lib.stage_config(tiny_config()), steps=2, warmup=1, torch="off")
  assert report["benchmark"] == "train" and report["devices"] == 8
  assert report["tokens_per_step"] == 8 * 32 and report["steps"] == 2
  assert report["tokens_per_sec"] > 0 and report["loop_tokens_per_sec"] > 0
  assert report["flops_per_token"] > report["flops_per_token_causal"] > 0
  assert report["achieved_gflops"] == pytest.approx(
      report["flops_per_token"] * report["tokens_per_sec"] / 1e9, abs=0.06)  # Rounded.
  assert report["mfu_vs_matmul"] > 0 and report["mfu_vs_peak"] is None  # No CPU datasheet.
  assert report["weight_matmul_ms"] > 0 and report["weight_matmul_share"] == pytest.approx(
      report["weight_matmul_ms"] / report["step_ms"], abs=1e-3)
  assert report["recompiles"] == 0 and report["attention"] == "chunked"
  for name in ("step_ms", "loop_step_ms"):  # Outliers are reported beside the median.
    assert 0 < report[f"{name}_min"] <= report[name] <= report[f"{name}_p90"] <= report[
        f"{name}_max"]
  assert report["loop_ratio"] > 0 and report["loop_ratio_of_means"] > 0
  assert len(report["gc_collections"]) == 3
  slow = report["slow_steps"]  # Every timed step, synchronised and back to back, once.
  assert slow["slow"]["count"] + slow["typical"]["count"] == 2 * 2
  assert report["memory_events_per_step"]["minor_faults"] >= 0
  # The same step computing in bfloat16, float32 parameters: timed beside it, same loss.
  bf16 = report["bf16"]
  assert bf16["step_ms"] > 0 and bf16["step_ms_ratio"] > 0 and bf16["matmul_gflops"] > 0
  assert bf16["first_loss"] == pytest.approx(report["first_loss"], abs=0.05)
  config = config_lib.stage_config(tiny_config())
  assert bench_train.bf16_twin(config.replace(model={"dtype": "bfloat16"}), {}) is None
  assert "torch" not in report
  json.dumps(report)  # One printable JSON object.


def test_a_lora_step_counts_its_frozen_base_in_the_flops():
  c = tiny_config()
  c.model.lora.rank, c.init_from = 2, "base_workdir"  # Random weights: the base is not read.
  config = config_lib.stage_config(c)
  report = bench_train.train(config, steps=1, warmup=0, torch="off")
  plain = flops_lib.train_flops_per_token(config.model, _params(config.model), 32)
  assert report["frozen_params_counted"] == plain["params_counted"]
  assert 0 < report["params_counted"] < report["frozen_params_counted"]  # The adapters.
  assert report["flops_per_token"] > 4 * report["frozen_params_counted"]


def _record_steps(monkeypatch, events: list, name: str):
  """Appends `name` to `events` at every train step of the programs compiled from now on."""
  compile_programs = steps_lib.compile_programs

  def spied(*args, **kwargs):
    programs = compile_programs(*args, **kwargs)
    step = programs.train_step
    programs.train_step = lambda *a: events.append(name) or step(*a)
    return programs

  monkeypatch.setattr(steps_lib, "compile_programs", spied)


def test_torch_is_timed_before_and_after_gptjax_and_compared_with_their_mean(monkeypatch):
  events, rates = [], iter([1e6, 3e6])

  def torch_run(*args, **kwargs):
    events.append("torch")
    return {"framework": "torch", "tokens_per_sec": next(rates)}

  monkeypatch.setattr(bench_train, "_torch_or_skip", torch_run)
  _record_steps(monkeypatch, events, "gptjax")
  report = bench_train.train(config_lib.stage_config(tiny_config()), steps=2, warmup=1,
                             torch="on", compare_bf16=False)
  # PyTorch before any gptjax step and after the last one: a drift of the machine shows.
  assert events[0] == "torch" and events[-1] == "torch" and events.count("torch") == 2
  assert events.count("gptjax") == 1 + 1 + 2 + 2  # First, warm-up, timed, loop.
  assert report["torch"]["tokens_per_sec_runs"] == [1e6, 3e6]
  assert report["ratio_to_torch"] == pytest.approx(report["tokens_per_sec"] / 2e6, abs=1e-3)


def test_bench_train_bf16_off_skips_the_bfloat16_twin(monkeypatch):
  calls = []
  monkeypatch.setattr(bench_train, "train", lambda config, **kw: calls.append(kw) or {})
  config = config_lib.stage_config(tiny_config())
  bench_train.run(config=config, steps=3, torch="off", bf16="off")
  bench_train.run(config=config, steps=3, torch="off")
  assert [c["compare_bf16"] for c in calls] == [False, True]

def test_synchronised_and_back_to_back_steps_alternate_in_rounds(monkeypatch):
  events, real_block = [], jax.block_until_ready
  _record_steps(monkeypatch, events, "step")
  monkeypatch.setattr(jax, "block_until_ready", lambda x: events.append("wait") or real_block(x))
  monkeypatch.setattr(bench_train, "ROUND", 2)
  report = bench_train.train(config_lib.stage_config(tiny_config()), steps=3, warmup=0,
                             torch="off", compare_bf16=False)
  timed = "".join("s" if e == "step" else "w" for e in events)[2:]  # After the first step.
  # Rounds of 2 then 1: synchronised steps (step, wait), then back-to-back ones, each waited
  # for once the next is dispatched, the last at the end (step, step, wait, wait).
  assert timed.startswith("swsw" + "ssww" + "sw" + "sw")
  assert report["steps"] == 3 and report["loop_step_ms"] > 0


def test_step_time_stats_and_gc_pauses():
  stats = bench_train.step_time_stats("step_ms", [0.1] * 9 + [1.0])
  assert stats == {"step_ms": 100.0, "step_ms_p90": 190.0, "step_ms_min": 100.0,
                   "step_ms_max": 1000.0}
  with probes.gc_pauses() as pauses:
    gc.collect()
    gc.collect(0)
  assert [g for g, _ in pauses] == [2, 0] and all(s >= 0 for _, s in pauses)
  assert bench_train.gc_stats(pauses)["gc_collections"] == [1, 0, 1]
  assert bench_train.gc_stats([])["gc_ms_max"] == 0


def test_slow_steps_are_set_beside_the_typical_ones_with_their_cpu_time():
  typical = {"wall": 1.0, "own": 1.9, "own_system": 0.1, "busy": 2.0, "steal": 0.0}
  stalled = {"wall": 1.5, "own": 1.9, "own_system": 0.1, "busy": 2.6, "steal": 0.3}
  loop = [{"wall": 2.0, "own": 3.8, "own_system": 0.2, "busy": 3.9, "steal": 0.0}] * 3
  report = bench_train.slow_steps([typical] * 8 + [stalled] * 2, loop)
  assert report["slow"] == {"count": 2, "wall_ms": 1500.0, "own_cpu_ms": 1900.0,
                            "own_system_ms": 100.0, "others_cpu_ms": 700.0, "steal_ms": 300.0}
  assert report["typical"]["count"] == 11 and report["typical"]["steal_ms"] == 0.0
  no_proc = bench_train.slow_steps([{"wall": 1.0, "own": 1.0, "own_system": 0.0}] * 3)
  assert no_proc["typical"] == {"count": 3, "wall_ms": 1000.0, "own_cpu_ms": 1000.0,
                                "own_system_ms": 0.0}
  assert no_proc["slow"] == {"count": 0}


def test_cpu_seconds_count_this_processs_work_and_the_machines():
  before = probes.cpu_seconds()
  deadline = time.process_time() + 0.2
  while time.process_time() < deadline:  # Busy: user time of this process.
    pass
  after = probes.cpu_seconds()
  assert after["own"] - before["own"] >= 0.19 and after["own_system"] >= before["own_system"]
  if "busy" in before:  # Linux: the machine was busy at least as long as this process.
    assert after["busy"] - before["busy"] >= 0.1 and after["steal"] >= before["steal"]


def test_logged_rate_reads_a_train_runs_windows_after_the_warm_up(tmp_path):
  rows = [{"step": 10 * i, "split": "train", "tokens_per_sec": rate}
          for i, rate in enumerate([100.0, 900.0, 1000.0, 1100.0], 1)]
  rows.insert(2, {"step": 20, "split": "eval", "loss": 1.0})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  report = bench_train.run(workdir=str(tmp_path))
  assert report["windows"] == 3 and report["tokens_per_sec"] == 1000.0  # The first skipped.
  assert report["tokens_per_sec_min"] == 900.0 and report["tokens_per_sec_max"] == 1100.0
  with pytest.raises(UserError, match="no train rows"):
    bench_train.logged_rate(str(tmp_path), skip=4)


def test_memory_events_count_this_processs_page_faults():
  before = probes.memory_events()
  touched = bytearray(64 << 20)  # Zeroed fresh pages: faults on first touch.
  touched[::4096] = b"x" * len(touched[::4096])
  after = probes.memory_events()
  assert after["minor_faults"] > before["minor_faults"]
  assert after.keys() == before.keys() and {"minor_faults", "major_faults"} <= after.keys()


def test_memory_bandwidth_is_the_faster_of_reading_and_copying(monkeypatch):
  # Seconds per pass: the sum (reads n bytes) takes 1 s, the scaling (reads and writes) 0.5 s.
  monkeypatch.setattr(probes, "compiled_best_seconds",
                      lambda fn, *args, repeats: 1.0 if fn is jnp.sum else 0.5)
  assert probes.memory_gbps(4096) == pytest.approx(4 * 4096 / 1e9)


def test_decode_peer_is_transformers_generate_on_the_same_model():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  config = config_lib.stage_config(tiny_config())
  generator = bench_decode.generator_from_config(config)
  assert generator.head_copy  # Exported tied again, without the generator's copy.
  peer = hf_generate.peer(generator, (1, 2), prompt_len=4, new_tokens=6, repeats=1)
  assert [r["batch"] for r in peer["results"]] == [1, 2], peer
  assert all(r["decode_tokens_per_sec"] > 0 for r in peer["results"])
  prompt = hf_generate.prompts(config.model.vocab_size, 1, 4)[0].tolist()
  greedy = generate_lib.Sampling(max_new_tokens=6, temperature=0)
  assert peer["results"][0]["row0_tokens"] == generator.generate([prompt], greedy)[0].tokens
  unmapped = config.replace(model={"positions": "rope", "norm": "layernorm"})  # No family.
  assert "skipped" in hf_generate.peer(bench_decode.generator_from_config(unmapped), (1,), 4, 6)


def test_torch_reference_only_times_the_model_it_implements():
  config = config_lib.stage_config(tiny_config())
  rope = config.replace(model={"positions": "rope"})
  assert "model.positions='rope'" in bench_train.torch_reference(rope, steps=1)["skipped"]
  bf16 = config.replace(model={"dtype": "bfloat16"})
  assert "model.dtype='bfloat16'" in bench_train.torch_reference(bf16, steps=1)["skipped"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is a benchmark-only extra: pip install -e .[bench]")
def test_torch_reference_is_the_same_network():
  from gptjax.bench import torch_gpt  # pylint: disable=import-outside-toplevel
  result = torch_gpt.measure(vocab=61, layers=2, heads=2, d_model=32, d_ff=64, seq_len=16,
                             batch=2, steps=2, warmup=1, threads=1)
  assert result["tokens_per_sec"] > 0
  cfg = model_lib.ModelConfig(vocab_size=61, num_layers=2, num_heads=2, d_model=32, d_ff=64,
                              max_len=16)
  assert result["params"] == sum(x.size for x in jax.tree.leaves(_params(cfg)))


@pytest.mark.slow
def test_bench_train_command_prints_one_json_object(tmp_path):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  out = gptjax("bench", "train", "--config", experiment, "--steps", "2", "--torch", "off")
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["benchmark"] == "train" and report["tokens_per_sec"] > 0
  assert report["steps"] == 2 and "torch" not in report
  missing = gptjax("bench", "train")
  assert missing.returncode == 1 and "needs --config" in missing.stderr
