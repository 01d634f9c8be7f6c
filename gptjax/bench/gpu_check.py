"""`python -m gptjax.bench.gpu_check OUT_DIR`: what issue 20 measures on one GPU, in one call.

Parts, most important first, so a run cut short still holds the main numbers:
  versions      Python, jax, jaxlib, flax, optax, orbax, the device, its memory, nvidia-smi's
                line, and which versions differ from requirements.txt's pins.
  train_base    `bench train` on experiments/gpt2_small_gpu.py on one device: batch 32 of
                1024 tokens, bf16 compute, float32 parameters, scanned layers, no remat,
                attention "auto" (cuDNN's fused kernel on an NVIDIA GPU).
  golden        tests/test_golden.py's config and batch on this device: its five steps'
                losses and gradient norms against the CPU's pinned ones, in float32 (highest
                matmul precision, then the default, TF32 on NVIDIA), and in bfloat16 (with
                "auto" and with "xla" attention), each at its dtype's tolerance.
  decode        `bench decode` at batch 1, 8 and 64 against the memory roofline.
  memory        `bench memory`: bytes per device against the device's limit.
  train_<lever> `bench train` with one lever changed from train_base (LEVERS).
  train_best    the levers that beat train_base by more than 2%, together.

Each part is a subprocess: XLA reads XLA_FLAGS once, when jax starts, and a crash or a hang
loses only that part. Each is time-boxed to the smaller of its cap and the budget left, and
killed (its whole process group) at the end of it. As each part ends, OUT_DIR/NAME.json holds
its record (command, status ok|failed|timeout|skipped, seconds, the benchmark's JSON, the end
of stderr on failure), OUT_DIR/logs/NAME.out and NAME.err its output, and OUT_DIR/summary.json
is rewritten with every record so far and a table of the key numbers.

The device image has jax, flax, optax and orbax but not ml_collections, grain or array_record.
Here (with pip): `--fetch_wheels .whl` downloads them (and this checkout's optax and orbax, see
WHEELS) for CPython 3.12 on x86-64 Linux; there:
`--wheels .whl` installs them with pip --no-index into a temporary folder on the parts'
PYTHONPATH. `--tiny` runs every part on experiments/gpu_check_tiny.py in seconds: the CPU dry
run (tests/test_gpu_check.py). The README's "On an accelerator" gives the device command.
"""

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_CONFIG = os.path.join(ROOT, "experiments", "gpt2_small_gpu.py")
TINY_CONFIG = os.path.join(ROOT, "experiments", "gpu_check_tiny.py")
# One device: the config's 8-way fsdp becomes the one GPU. gptjax's CPU XLA flags are left
# out: they tune XLA:CPU only, and a jaxlib that does not know one refuses to start.
ONE_DEVICE = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
              "--config.host.xla_cpu_flags=")
GPU_BATCH = 32  # Sequences of 1024 tokens a step: what 80 GB holds without remat.
TINY_BATCH = 8  # experiments/gpu_check_tiny.py's.
# Carried to the device at the versions tested here: what its image lacks (ml_collections,
# grain and what grain needs), and optax and orbax-checkpoint, pure Python and their newest
# releases, so only jax, jaxlib and flax come from the image (flax newer than 0.12.8 needs the
# image's jax 0.11).
WHEELS = ("ml_collections", "grain", "array_record", "portpicker", "importlib_resources",
          "optax", "orbax-checkpoint")
VERSIONS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "flax", "optax",
            "orbax-checkpoint", "numpy", "ml_collections", "grain")
MIN_PART_S = 30  # Below this much budget a part is skipped: it could not finish compiling.
# --tiny's cap on every part: compiling even the tiny model takes a shared 2-core CPU a minute.
TINY_CAP_S = 240


@dataclasses.dataclass(frozen=True)
class Lever:
  """One change from train_base: config overrides and XLA flags."""
  about: str
  overrides: tuple[str, ...] = ()
  xla_flags: str = ""
  batch: float = 1.0  # Times train_base's batch size.


# The levers that matter on Hopper (MaxText's and JAX's GPU performance guides). A flag that
# this jaxlib does not know makes XLA refuse to start: that part fails, the rest run.
LEVERS = {
    "noscan": Lever("unscanned layers: XLA schedules and fuses across layer boundaries",
                    ("--config.model.scan_layers=false",)),
    "xla_attention": Lever("XLA's attention instead of cuDNN's fused kernel",
                           ("--config.model.attention=xla",)),
    "latency_hiding": Lever("XLA's latency-hiding scheduler",
                            xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true"),
    "no_triton_gemm": Lever("cuBLAS for every GEMM instead of Triton-fused ones",
                            xla_flags="--xla_gpu_enable_triton_gemm=false"),
    "batch_x2_dots": Lever("twice the batch, keeping only matmul outputs for the backward",
                           ("--config.model.remat=dots",), batch=2),
    "batch_half": Lever("half the batch", batch=0.5),
}
BEST_MARGIN = 1.02  # A lever joins train_best when it beats train_base by more than 2%.


@dataclasses.dataclass(frozen=True)
class Part:
  """A subprocess `python ARGV` run with XLA_FLAGS += xla_flags, for at most cap_s."""
  name: str
  argv: tuple[str, ...]
  cap_s: float
  xla_flags: str = ""
  about: str = ""


# ----------------------------------------------------------------------------- the plan


def _config_args(tiny: bool, batch: int, overrides=()) -> tuple[str, ...]:
  return ("--config", TINY_CONFIG if tiny else GPU_CONFIG, *ONE_DEVICE,
          f"--config.train.batch_size={batch}", *overrides)


def _bench(kind: str, *args: str) -> tuple[str, ...]:
  return ("-m", "gptjax", "bench", kind, *args)


def train_part(name: str, levers: list[str], tiny: bool) -> Part:
  """`bench train` with `levers` applied to train_base."""
  base = TINY_BATCH if tiny else GPU_BATCH
  batch, overrides, flags = base, [], []
  for lever in map(LEVERS.__getitem__, levers):
    batch = max(1, int(base * lever.batch)) if lever.batch != 1 else batch
    overrides += lever.overrides
    flags += lever.xla_flags.split()
  about = "; ".join(LEVERS[lever].about for lever in levers) or "experiments/gpt2_small_gpu.py"
  return Part(name, _bench("train", *_config_args(tiny, batch, overrides),
                           f"--steps={2 if tiny else 20}", "--torch=off"),
              TINY_CAP_S if tiny else 120, " ".join(flags), about)


def plan(tiny: bool) -> list[Part]:
  """Every part but train_best (which depends on the levers' results), in running order."""
  caps = {"versions": 60, "golden": 120, "decode": 150, "memory": 90}
  if tiny:
    caps = {k: TINY_CAP_S for k in caps}
  own = ("-m", "gptjax.bench.gpu_check", "--part")
  batch = TINY_BATCH if tiny else GPU_BATCH
  return [
      Part("versions", (*own, "versions"), caps["versions"],
           about="software versions and the device"),
      train_part("train_base", [], tiny),
      Part("golden", (*own, "golden"), caps["golden"],
           about="tests/test_golden.py's losses on this device"),
      Part("decode", _bench("decode", *_config_args(tiny, batch), "--batch_sizes=1,8,64"),
           caps["decode"], about="cached decoding at batch 1, 8 and 64"),
      Part("memory", _bench("memory", *_config_args(tiny, batch)), caps["memory"],
           about="bytes per device of the train step"),
      *(train_part(f"train_{lever}", [lever], tiny) for lever in LEVERS),
  ]


def best_levers(records: dict) -> list[str]:
  """The levers whose train part beat train_base by BEST_MARGIN (of the batch levers, only the
  fastest), or [] when fewer than two did: then the best is already measured."""
  def rate(name):
    record = records.get(name) or {}
    if record.get("status") != "ok":
      return None
    return record["result"].get("tokens_per_sec")

  base = rate("train_base")
  if not base:
    return []
  better = {lever: rate(f"train_{lever}") for lever in LEVERS
            if (rate(f"train_{lever}") or 0) > BEST_MARGIN * base}
  batch_levers = sorted((lever for lever in better if LEVERS[lever].batch != 1),
                        key=better.get)
  chosen = [lever for lever in better if lever not in batch_levers[:-1]]
  return chosen if len(chosen) >= 2 else []


# ----------------------------------------------------------------------------- running


def _json_from(stdout: str):
  """The JSON object a part printed (a benchmark's `indent=2` object, or one line)."""
  decoder = json.JSONDecoder()
  for start in (i for i, c in enumerate(stdout) if c == "{" and (i == 0 or stdout[i - 1] == "\n")):
    try:
      return decoder.raw_decode(stdout[start:])[0]
    except json.JSONDecodeError:
      continue
  return None


def run_part(part: Part, out_dir: str, timeout_s: float, env: dict) -> dict:
  """Runs `part` for at most timeout_s; writes and returns its record."""
  logs = os.path.join(out_dir, "logs")
  os.makedirs(logs, exist_ok=True)
  env = dict(env)
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), part.xla_flags) if f)
  command = [sys.executable, *part.argv]
  record = {"name": part.name, "about": part.about, "command": shlex.join(command[1:]),
            "xla_flags": env["XLA_FLAGS"], "timeout_s": round(timeout_s, 1)}
  out_path, err_path = (os.path.join(logs, part.name + ext) for ext in (".out", ".err"))
  start = time.monotonic()
  with open(out_path, "w") as out, open(err_path, "w") as err:
    # A session of its own: on timeout the part and every process it started are killed.
    process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT,
                               start_new_session=True)
    try:
      code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      code = None
  record["seconds"] = round(time.monotonic() - start, 1)
  with open(out_path) as f:
    record["result"] = _json_from(f.read())
  with open(err_path) as f:
    stderr = f.read()
  if code is None:
    record["status"] = "timeout"
  elif code == 0 and record["result"] is not None:
    record["status"] = "ok"
  else:
    record["status"] = "failed"
    record["returncode"] = code
  if record["status"] != "ok":
    record["error"] = stderr[-3000:]
  _write(os.path.join(out_dir, part.name + ".json"), record)
  return record


def _write(path: str, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)  # A reader never sees half a file, even after a kill.


def _skip(part: Part, out_dir: str, why: str) -> dict:
  record = {"name": part.name, "about": part.about, "status": "skipped", "why": why}
  _write(os.path.join(out_dir, part.name + ".json"), record)
  return record


TRAIN_KEYS = ("batch_size", "attention", "step_ms", "tokens_per_sec", "mfu_vs_peak",
              "mfu_vs_peak_causal", "mfu_vs_matmul", "matmul_gflops", "peak_gflops",
              "weight_matmul_share", "compile_s", "first_loss")


def summarize(records: dict, header: dict) -> dict:
  """The key numbers of every part so far, then every record."""
  def result(name):
    record = records.get(name) or {}
    return record.get("result") if record.get("status") == "ok" else None

  train = [{"part": name, "status": r["status"], "xla_flags": r.get("xla_flags", ""),
            "about": r.get("about", ""),
            **{k: (result(name) or {}).get(k) for k in TRAIN_KEYS}}
           for name, r in records.items() if name.startswith("train_")]
  ok = [row for row in train if row["tokens_per_sec"]]
  golden = result("golden") or {}
  return {
      **header,
      "versions": result("versions"),
      "train": train,
      "fastest_train": max(ok, key=lambda row: row["tokens_per_sec"])["part"] if ok else None,
      "golden_pass": {k: v["pass"] for k, v in golden.get("variants", {}).items()},
      "decode": [{k: row.get(k) for k in ("batch", "decode_tokens_per_sec",
                                          "memory_bound_tokens_per_sec", "ratio",
                                          "decode_ms_per_step")}
                 for row in (result("decode") or {}).get("results", [])],
      "memory": {k: (result("memory") or {}).get(k) for k in (
          "total_bytes_per_device", "device_bytes_limit", "fits")},
      "status": {name: r["status"] for name, r in records.items()},
      "records": records,
  }


def run_parts(parts: list[Part], out_dir: str, budget_s: float, env: dict, header: dict, *,
              best: bool = True, tiny: bool = False, min_part_s: float = MIN_PART_S) -> dict:
  """Runs `parts` in order within `budget_s`, then (with `best`) train_best if two levers
  helped; rewrites OUT_DIR/summary.json after each part. Returns the summary."""
  os.makedirs(out_dir, exist_ok=True)
  start = time.monotonic()
  records = {}

  def attempt(part: Part, skip_why: str | None = None):
    left = budget_s - (time.monotonic() - start)
    if skip_why is None and left < min_part_s:
      skip_why = f"budget: {left:.0f}s of {budget_s:.0f}s left"
    if skip_why:
      records[part.name] = _skip(part, out_dir, skip_why)
    else:
      print(f"gpu_check: {part.name} (at most {min(part.cap_s, left):.0f}s) ...", flush=True)
      records[part.name] = run_part(part, out_dir, min(part.cap_s, left), env)
      print(f"gpu_check: {part.name} {records[part.name]['status']} in "
            f"{records[part.name]['seconds']}s", flush=True)
    header["elapsed_s"] = round(time.monotonic() - start, 1)
    _write(os.path.join(out_dir, "summary.json"), summarize(records, header))

  for part in parts:
    attempt(part)
  if best:
    levers = best_levers(records)
    attempt(train_part("train_best", levers, tiny), None if levers else (
        f"fewer than two levers beat train_base by {BEST_MARGIN - 1:.0%}: the fastest part "
        "measured is the best"))
  return summarize(records, header)


# ----------------------------------------------------------------------------- parts run here


def _pins() -> dict:
  pins = {}
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    for line in f:
      name, sep, version = line.strip().partition("==")
      if sep:
        pins[name.lower()] = version
  return pins


def versions() -> dict:
  """Software versions, the device, and the versions that differ from requirements.txt."""
  import jax  # pylint: disable=import-outside-toplevel

  found = {}
  for name in VERSIONS:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  devices = jax.devices()
  limit = (devices[0].memory_stats() or {}).get("bytes_limit")
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                         check=False).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    smi = None
  pins = _pins()
  return {"python": platform.python_version(), "packages": found,
          "differs_from_pins": {k: {"pinned": pins[k], "found": v} for k, v in found.items()
                                if k in pins and pins[k] != v},
          "platform": devices[0].platform, "device": devices[0].device_kind,
          "devices": len(devices), "device_bytes_limit": limit, "nvidia_smi": smi,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


# name -> (model overrides, jax_default_matmul_precision, {metric: relative tolerance}), the
# largest relative deviation over the five steps. float32 at the highest precision differs
# from the CPU only in the order of its sums: a few times the CPU-to-CPU tolerance of
# tests/test_golden.py. TF32 keeps 10 mantissa bits and bfloat16 7, and the Adam updates
# amplify round-off in the gradient norm: bf16 compute on the CPU deviates 9e-4 in the loss
# and 6e-2 in the gradient norm (measured, XLA:CPU, jax 0.10.2).
BF16_TOLERANCE = {"loss": 1e-2, "assistant_loss": 1e-2, "grad_norm": 0.15}
GOLDEN_VARIANTS = {
    "float32_highest": ({}, "highest", {"loss": 1e-4, "assistant_loss": 1e-4,
                                         "grad_norm": 5e-3}),
    "float32_default": ({}, None, {"loss": 5e-3, "assistant_loss": 5e-3, "grad_norm": 5e-2}),
    "bfloat16": ({"dtype": "bfloat16"}, None, BF16_TOLERANCE),
    "bfloat16_xla_attention": ({"dtype": "bfloat16", "attention": "xla"}, None, BF16_TOLERANCE),
}


def golden() -> dict:
  """tests/test_golden.py's train steps on this device, per GOLDEN_VARIANTS."""
  import jax  # pylint: disable=import-outside-toplevel

  # The backends start first: tests/conftest.py (imported by test_golden) sets JAX_PLATFORMS
  # and XLA_FLAGS for CPU test runs, which must not apply here.
  device = jax.devices()[0]
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import test_golden  # pylint: disable=import-outside-toplevel,import-error

  variants = {}
  for name, (overrides, precision, tolerance) in GOLDEN_VARIANTS.items():
    try:
      with jax.default_matmul_precision(precision):
        got = test_golden.run_golden(len(test_golden.GOLDEN["loss"]), **overrides)
    except Exception as e:  # noqa: BLE001  One variant failing (a kernel, a flag) is a result.
      variants[name] = {"pass": False, "error": f"{type(e).__name__}: {e}"[:2000]}
      continue
    deviation = {k: max(abs(a - b) / abs(b) for a, b in zip(got[k], test_golden.GOLDEN[k]))
                 for k in test_golden.GOLDEN}
    variants[name] = {"pass": all(deviation[k] <= tolerance[k] for k in deviation),
                      "max_relative_deviation": {k: float(f"{v:.3g}") for k, v in
                                                 deviation.items()},
                      "tolerance": tolerance, "got": got, "overrides": overrides,
                      "matmul_precision": precision}
  return {"device": device.device_kind, "pinned": test_golden.GOLDEN, "variants": variants}


PARTS_HERE = {"versions": versions, "golden": golden}


# ----------------------------------------------------------------------------- wheels


def fetch_wheels(folder: str):
  """Downloads WHEELS (this environment's versions) for the device's CPython 3.12, x86-64."""
  os.makedirs(folder, exist_ok=True)
  pins = []
  for name in WHEELS:
    try:
      pins.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
      pins.append(name)
  platforms = [f"--platform={p}" for p in (
      "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
      "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")]
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                  "--python-version=3.12", "--implementation=cp", *platforms, "-d", folder,
                  *pins], check=True)
  print(f"Wheels for the device in {folder}: carry that folder and pass --wheels {folder}.")


def install_wheels(folder: str, out_dir: str) -> str:
  """pip-installs every wheel in `folder` (no index, no dependencies) into a temporary folder,
  logging to OUT_DIR/logs/wheels.log; returns that folder."""
  wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
  if not wheels:
    sys.exit(f"gpu_check: --wheels {folder} holds no .whl files; make them with "
             f"--fetch_wheels {folder} where pip can reach the index.")
  site = tempfile.mkdtemp(prefix="gptjax_wheels_")
  os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
  with open(os.path.join(out_dir, "logs", "wheels.log"), "w") as log:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wheels],
                   stdout=log, stderr=subprocess.STDOUT, check=True)
  return site


# ----------------------------------------------------------------------------- command line


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("out_dir", nargs="?", help="Folder for the JSON results and logs.")
  parser.add_argument("--budget", type=float, default=480,
                      help="Seconds for every part together (default 480).")
  parser.add_argument("--tiny", action="store_true",
                      help="The CPU dry run: experiments/gpu_check_tiny.py, short caps.")
  parser.add_argument("--only", default="",
                      help="Comma-separated part names to run (versions always runs).")
  parser.add_argument("--wheels", help="Folder of wheels to install before the parts run.")
  parser.add_argument("--fetch_wheels", help="Download the wheels the device lacks; then exit.")
  parser.add_argument("--part", choices=sorted(PARTS_HERE), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.part:
    print(json.dumps(PARTS_HERE[args.part]()))
    return
  if args.fetch_wheels:
    fetch_wheels(args.fetch_wheels)
    return
  if not args.out_dir:
    parser.error("give OUT_DIR (or --fetch_wheels DIR)")
  parts = plan(args.tiny)
  if args.only:
    names = {"versions", *args.only.split(",")}
    unknown = names - {p.name for p in parts} - {"train_best"}
    if unknown:
      parser.error(f"--only: no part {', '.join(sorted(unknown))}; parts: "
                   + ", ".join(p.name for p in parts) + ", train_best")
    parts = [p for p in parts if p.name in names]
  env = dict(os.environ)
  paths = [ROOT]
  if args.wheels:
    paths.insert(0, install_wheels(args.wheels, args.out_dir))
  env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
  env["PYTHONUNBUFFERED"] = "1"
  # JAX takes 75% of GPU memory by default; one part at a time may take more (XLA attention
  # keeps batch 32's score matrices, ~30 GB, beside the rest).
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  header = {"started_utc": started, "budget_s": args.budget, "tiny": args.tiny,
            "config": TINY_CONFIG if args.tiny else GPU_CONFIG, "wheels": args.wheels,
            "mem_fraction": env["XLA_PYTHON_CLIENT_MEM_FRACTION"]}
  summary = run_parts(parts, args.out_dir, args.budget, env, header,
                      best=not args.only or "train_best" in args.only.split(","),
                      tiny=args.tiny, min_part_s=5 if args.tiny else MIN_PART_S)
  print(json.dumps({k: summary[k] for k in ("status", "fastest_train", "golden_pass")}))


if __name__ == "__main__":
  main()
