"""The GPU check (gptjax/bench/gpu_check.py) and what a GPU run would trip on, caught on the CPU:
its time boxes and records, the lever combination, the cuDNN attention path's checks, and the
whole check dry-run on experiments/gpu_check_tiny.py."""

import json
import os
import subprocess
import sys
import types

import jax
import pytest
from conftest import ROOT, gptjax

from gptjax import model as model_lib
from gptjax.bench import gpu_check
from gptjax.errors import UserError

H100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")


def _cfg(**overrides):
  shape = {"vocab_size": 64, "num_layers": 1, "num_heads": 2, "d_model": 32, "d_ff": 64,
           "max_len": 16}
  return model_lib.ModelConfig(**{**shape, **overrides})


def test_cudnn_attention_off_an_nvidia_gpu_is_a_user_error():
  with pytest.raises(UserError, match=r"model.attention='cudnn' cannot run here: .*NVIDIA"):
    model_lib.attention_implementation(_cfg(attention="cudnn", dtype="bfloat16"))
  assert model_lib.attention_implementation(_cfg()) == "chunked"  # "auto" on the CPU.


def test_cudnn_takes_16_bit_inputs_and_head_dims_up_to_128(monkeypatch):
  assert model_lib.cudnn_unsupported(_cfg(dtype="bfloat16"), H100) is None
  assert "model.dtype='float32'" in model_lib.cudnn_unsupported(_cfg(), H100)
  assert "head dims" in model_lib.cudnn_unsupported(
      _cfg(dtype="bfloat16", num_heads=4, d_model=40), H100)  # Head dim 10.
  # On an H100, "auto" takes cuDNN for bf16 and falls back to XLA for float32; naming cuDNN
  # for float32 is refused with the key to change, not jax's error from inside lowering.
  monkeypatch.setattr(jax, "devices", lambda *args: [H100])
  assert model_lib.attention_implementation(_cfg(dtype="bfloat16")) == "cudnn"
  assert model_lib.attention_implementation(_cfg()) == "xla"
  with pytest.raises(UserError, match="bfloat16 or float16"):
    model_lib.attention_implementation(_cfg(attention="cudnn"))


def test_bench_decode_refuses_bad_batch_sizes():
  out = gptjax("bench", "decode", "--config", "experiments/gpu_check_tiny.py",
               "--batch_sizes=1,x")
  assert out.returncode == 1
  assert "--batch_sizes=1,x is not a list of batch sizes" in out.stderr


def _python(name, code, cap_s=30.0):
  return gpu_check.Part(name, ("-c", code), cap_s)


def test_parts_are_time_boxed_and_every_one_leaves_a_record(tmp_path):
  parts = [_python("fine", "print('{\"x\": 1}')"),
           _python("broken", "import sys; print('boom', file=sys.stderr); sys.exit(3)"),
           _python("hangs", "import time; print('{\"partial\": 2}', flush=True); "
                   "time.sleep(60)"),
           _python("late", "print('{}')")]
  summary = gpu_check.run_parts(parts, str(tmp_path), budget_s=4, env=dict(os.environ),
                                header={}, best=False, min_part_s=0.5)
  assert summary["status"] == {"fine": "ok", "broken": "failed", "hangs": "timeout",
                               "late": "skipped"}
  records = {p.name: json.loads((tmp_path / f"{p.name}.json").read_text()) for p in parts}
  assert records["fine"]["result"] == {"x": 1}
  assert records["broken"]["returncode"] == 3 and "boom" in records["broken"]["error"]
  assert records["hangs"]["result"] == {"partial": 2}  # What it printed before the kill.
  assert records["hangs"]["seconds"] < 10
  assert records["late"]["why"].startswith("budget")
  assert json.loads((tmp_path / "summary.json").read_text())["status"] == summary["status"]
  assert (tmp_path / "logs" / "broken.err").read_text() == "boom\n"


def _train(tokens_per_sec):
  return {"status": "ok", "result": {"tokens_per_sec": tokens_per_sec}}


def test_train_best_combines_the_levers_that_helped():
  records = {"train_base": _train(100), "train_noscan": _train(110),
             "train_latency_hiding": _train(105), "train_xla_attention": _train(101),
             "train_batch_x2_dots": _train(120), "train_batch_half": _train(103),
             "train_no_triton_gemm": {"status": "failed", "result": None}}
  # Of the batch levers only the faster one: the two set the same key.
  assert gpu_check.best_levers(records) == ["noscan", "latency_hiding", "batch_x2_dots"]
  best = gpu_check.train_part("train_best", gpu_check.best_levers(records), tiny=False)
  assert {"--config.model.scan_layers=false", "--config.model.remat=dots",
          "--config.train.batch_size=64"} <= set(best.argv)
  assert best.xla_flags == "--xla_gpu_enable_latency_hiding_scheduler=true"
  # One lever alone is already measured; no base, nothing to compare.
  assert gpu_check.best_levers({"train_base": _train(100), "train_noscan": _train(110)}) == []
  assert gpu_check.best_levers({"train_noscan": _train(110)}) == []


def test_every_part_runs_on_one_device_without_the_cpu_flags():
  for part in gpu_check.plan(tiny=False):
    if "bench" in part.argv:
      assert gpu_check.GPU_CONFIG in part.argv
      assert set(gpu_check.ONE_DEVICE) <= set(part.argv), part.name


@pytest.mark.slow
def test_golden_part_compares_with_the_pinned_losses(monkeypatch):
  monkeypatch.setattr(gpu_check, "GOLDEN_VARIANTS",
                      {"float32_highest": gpu_check.GOLDEN_VARIANTS["float32_highest"]})
  result = gpu_check.golden()
  variant = result["variants"]["float32_highest"]
  assert variant["pass"], variant
  assert variant["max_relative_deviation"]["loss"] < 1e-5  # The CPU the goldens came from.


@pytest.mark.slow
def test_tiny_dry_run_writes_every_result(tmp_path):
  # One CPU device, as on one GPU; the whole check but the levers, which only repeat
  # train_base's command with other flags.
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "gptjax.bench.gpu_check", str(tmp_path), "--tiny",
                        "--only=train_base,decode,memory", "--budget=900"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=1000,
                       check=False)
  assert out.returncode == 0, out.stderr
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == {"versions": "ok", "train_base": "ok", "decode": "ok",
                               "memory": "ok"}, summary["records"]
  assert summary["versions"]["packages"]["jax"] == jax.__version__
  assert summary["train"][0]["tokens_per_sec"] > 0
  assert [row["batch"] for row in summary["decode"]] == [1, 8, 64]
  assert summary["memory"]["total_bytes_per_device"] > 0
  for name in summary["status"]:
    assert json.loads((tmp_path / f"{name}.json").read_text())["status"] == "ok"
