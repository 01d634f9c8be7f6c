"""Host runtime settings: what must be in place before the process computes anything.

Two settings (`config.host`), each measured on the CPU train benchmark
(`python -m gptjax bench train --config experiments/bench_cpu.py`, 2 Zen 4 cores):

  hugepages      XLA:CPU allocates a step's temporaries afresh on every call (700 MB for the
                 reference step), and glibc serves an allocation that large with a new mmap,
                 so the kernel faults in and zeroes ~185,000 4-KiB pages a step: 18% of the
                 step time. glibc's tunable `glibc.malloc.hugetlb=1` backs these allocations
                 with 2-MiB transparent huge pages (~900 faults a step). glibc reads tunables
                 only when a process starts, so the command line re-executes itself once with
                 GLIBC_TUNABLES set (Linux with glibc and transparent huge pages only).
  xla_cpu_flags  XLA flags for the CPU backend. "auto" is CPU_XLA_FLAGS, the fastest measured:
                 the dots run through XLA's default CPU kernels rather than the YNNPACK
                 fusions (7% faster train step). Flags in the XLA_FLAGS environment variable
                 come after these, so a user's own setting of the same flag wins.

Neither changes what is computed (tests/test_golden.py runs with them). Both act at process
start only: in a notebook, set `os.environ["XLA_FLAGS"] = host.xla_flags(...)` before jax's
first computation, and start Jupyter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.

This module must not import jax: it runs before jax initialises its backends.
"""

import os
import platform
import sys

CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def xla_flags(xla_cpu_flags: str = "auto", environ: str | None = None) -> str:
  """The XLA_FLAGS value: gptjax's CPU flags ("auto"), none (""), or the given ones, then the
  flags already in `environ` (default: the XLA_FLAGS environment variable)."""
  environ = os.environ.get("XLA_FLAGS", "") if environ is None else environ
  ours = CPU_XLA_FLAGS if xla_cpu_flags == "auto" else xla_cpu_flags
  flags = [f for f in ours.split() if f not in environ.split()]
  return " ".join(flags + environ.split())


def hugepages_supported() -> bool:
  """Linux with glibc and transparent huge pages not switched off."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def glibc_tunables(hugepages: bool, environ: str | None = None) -> str:
  """The GLIBC_TUNABLES value with (or, unchanged, without) the huge-page malloc tunable."""
  environ = os.environ.get("GLIBC_TUNABLES", "") if environ is None else environ
  if not hugepages or "glibc.malloc.hugetlb" in environ:
    return environ  # A user's own setting of the tunable is kept.
  return ":".join(t for t in (environ, HUGEPAGES_TUNABLE) if t)


def settings(hugepages: bool, xla_cpu_flags: str) -> dict:
  """Environment variables to set for `config.host`: {name: value}."""
  env = {"XLA_FLAGS": xla_flags(xla_cpu_flags)}
  if hugepages and hugepages_supported():
    env["GLIBC_TUNABLES"] = glibc_tunables(True)
  return {k: v for k, v in env.items() if v != os.environ.get(k, "")}


def apply(hugepages: bool, xla_cpu_flags: str, argv: list[str]):
  """Sets `config.host` for this process; re-executes `argv` (a `python -m gptjax` command
  line) once if glibc must see a new tunable. Call before jax computes anything."""
  env = settings(hugepages, xla_cpu_flags)
  if "jax" in sys.modules and "XLA_FLAGS" in env:
    # jax reads XLA_FLAGS when it first initialises a backend: too late if it has.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise RuntimeError("gptjax.host.apply must run before jax initialises its backends.")
  os.environ.update(env)
  if "GLIBC_TUNABLES" in env and not os.environ.get("GPTJAX_REEXECUTED"):
    os.environ["GPTJAX_REEXECUTED"] = "1"  # Never twice, whatever glibc makes of the tunable.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "gptjax", *argv[1:]])


def started_with(name: str) -> str:
  """The value of environment variable `name` when this process started ("" if unset), which
  is what glibc saw: /proc/self/environ is not changed by later os.environ updates."""
  try:
    with open("/proc/self/environ", "rb") as f:
      entries = f.read().split(b"\0")
  except OSError:
    return os.environ.get(name, "")
  prefix = name.encode() + b"="
  return next((e[len(prefix):].decode() for e in entries if e.startswith(prefix)), "")


def describe() -> dict:
  """The settings in force, for benchmark reports."""
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""),
          "hugepages": HUGEPAGES_TUNABLE in started_with("GLIBC_TUNABLES")}
