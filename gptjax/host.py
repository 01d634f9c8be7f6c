"""Host runtime settings: what must be in place before the process computes anything.

Three settings (`config.host`), each measured on the CPU train benchmark
(`python -m gptjax bench train --config experiments/bench_cpu.py`, 2-core VMs):

  allocator      "auto" (the default): jemalloc where its library is installed (Debian and
                 Ubuntu: apt-get install libjemalloc2), else glibc's malloc; or "jemalloc",
                 "glibc". XLA:CPU allocates a step's temporaries afresh on every call: for
                 the reference step one 604 MB block, which glibc maps anew on each step and
                 unmaps after it (glibc serves any block over 32 MB with its own mmap, and
                 no tunable keeps it), so the kernel zeroes 604 MB of fresh pages every step:
                 ~120 ms of CPU time a step, and 350-580 ms in the steps it stalls (the
                 steps over 1.1x the median in `bench train`'s `slow_steps`). jemalloc,
                 with JEMALLOC_CONF (no separate arena for large blocks, freed pages kept
                 30 s), hands the same pages back to the next step: kernel time 5-24 ms a
                 step, the step 19-20% shorter in two A/B pairs (6-21% in later runs), at
                 the cost of keeping the freed memory (peak resident memory +0.7 GB on the
                 reference step). It must be loaded when the process starts, so the command
                 line re-executes itself once with LD_PRELOAD (and MALLOC_CONF, unless set)
                 in its environment.
  hugepages      With glibc's malloc only: XLA:CPU allocates a step's temporaries afresh on
                 every call (700 MB for the reference step), and glibc serves an allocation
                 that large with a new mmap, so the kernel faults in and zeroes ~185,000
                 4-KiB pages a step: 18% of the step time. glibc's tunable
                 `glibc.malloc.hugetlb=1` backs these allocations with 2-MiB transparent
                 huge pages (~900 faults a step). glibc reads tunables
                 only when a process starts, so the command line re-executes itself once with
                 GLIBC_TUNABLES set (Linux with glibc and transparent huge pages only).
  xla_cpu_flags  XLA flags for the CPU backend. "auto" is CPU_XLA_FLAGS, the fastest measured:
                 the dots run through XLA's default CPU kernels rather than the YNNPACK
                 fusions (7% faster train step). Flags in the XLA_FLAGS environment variable
                 come after these, so a user's own setting of the same flag wins.

None changes what is computed (tests/test_golden.py runs with them). All act at process
start only: in a notebook, set `os.environ["XLA_FLAGS"] = host.xla_flags(...)` before jax's
first computation, and start Jupyter with LD_PRELOAD=libjemalloc.so.2 and
MALLOC_CONF=<JEMALLOC_CONF> (or GLIBC_TUNABLES=glibc.malloc.hugetlb=1).

This module must not import jax: it runs before jax initialises its backends.
"""

import ctypes.util
import os
import platform
import sys

from gptjax.errors import UserError

ALLOCATORS = ("auto", "jemalloc", "glibc")
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # In LD_PRELOAD: "auto" keeps it.
# Large blocks from the ordinary arenas (whose freed pages are reused) instead of a separate
# one that returns them to the kernel at once; freed pages kept 30 s before being returned.
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:30000,muzzy_decay_ms:30000"
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


def jemalloc_library() -> str | None:
  """The name to preload jemalloc by (e.g. "libjemalloc.so.2"), or None where it is not
  installed or cannot be preloaded (only Linux is supported)."""
  if sys.platform != "linux":
    return None
  return ctypes.util.find_library("jemalloc")


def allocator_library(allocator: str, found: str | None,
                      preloaded: str | None = None) -> str | None:
  """The allocator library to preload for `config.host.allocator`, given the jemalloc library
  `found` here (None: not installed) and what LD_PRELOAD holds already (`preloaded`,
  default: the environment's); None means no change (glibc's malloc, or the allocator the
  environment already preloads: "auto" keeps a tcmalloc, jemalloc or mimalloc of yours, as
  on machine images that preload tcmalloc)."""
  if allocator not in ALLOCATORS:
    raise UserError(f"host.allocator={allocator!r} is not one of {ALLOCATORS}; use 'auto' "
                    "(jemalloc where installed), 'jemalloc' or 'glibc'.")
  if allocator == "jemalloc" and found is None:
    raise UserError("host.allocator='jemalloc' but no jemalloc library is installed here; "
                    "install it (Debian/Ubuntu: apt-get install libjemalloc2) or use "
                    "host.allocator='auto' or 'glibc'.")
  if allocator == "auto" and preloads_allocator(preloaded):
    return None
  return None if allocator == "glibc" else found


def preloads_allocator(preloaded: str | None = None) -> bool:
  """Whether LD_PRELOAD (`preloaded`, default: the environment's) holds a malloc library."""
  preloaded = os.environ.get("LD_PRELOAD", "") if preloaded is None else preloaded
  return any(name in preloaded for name in _OTHER_ALLOCATORS)


def preload(library: str, environ: str | None = None) -> str:
  """The LD_PRELOAD value with `library` first (once), then what `environ` (default: the
  LD_PRELOAD environment variable) already preloads."""
  environ = os.environ.get("LD_PRELOAD", "") if environ is None else environ
  others = [e for e in environ.replace(":", " ").split() if e != library]
  return " ".join([library, *others])


def settings(hugepages: bool, xla_cpu_flags: str, allocator: str = "glibc",
             jemalloc: str | None = None) -> dict:
  """Environment variables to set for `config.host`: {name: value}. `jemalloc` is the
  library found here (see jemalloc_library)."""
  env = {"XLA_FLAGS": xla_flags(xla_cpu_flags)}
  library = allocator_library(allocator, jemalloc)
  if library:
    env["LD_PRELOAD"] = preload(library)
    env["MALLOC_CONF"] = os.environ.get("MALLOC_CONF") or JEMALLOC_CONF  # Yours wins.
  elif hugepages and hugepages_supported() and not preloads_allocator():
    env["GLIBC_TUNABLES"] = glibc_tunables(True)  # Moot where another malloc is preloaded.
  return {k: v for k, v in env.items() if v != os.environ.get(k, "")}


def apply(hugepages: bool, xla_cpu_flags: str, argv: list[str], allocator: str = "glibc"):
  """Sets `config.host` for this process; re-executes `argv` (a `python -m gptjax` command
  line) once if the dynamic loader or glibc must see a new setting. Call before jax computes
  anything."""
  env = settings(hugepages, xla_cpu_flags, allocator,
                 jemalloc_library() if allocator != "glibc" else None)
  if "jax" in sys.modules and "XLA_FLAGS" in env:
    # jax reads XLA_FLAGS when it first initialises a backend: too late if it has.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise RuntimeError("gptjax.host.apply must run before jax initialises its backends.")
  os.environ.update(env)
  if ({"GLIBC_TUNABLES", "LD_PRELOAD"} & env.keys()) and not os.environ.get("GPTJAX_REEXECUTED"):
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
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "allocator": allocator_in_use(),
          "hugepages": HUGEPAGES_TUNABLE in started_with("GLIBC_TUNABLES")}


def allocator_in_use(maps: str | None = None) -> str:
  """The malloc library this process has loaded ("jemalloc", "tcmalloc", "mimalloc"; Linux:
  its memory maps say, or `maps`, a /proc/PID/maps text), else "glibc"."""
  if maps is None:
    try:
      with open("/proc/self/maps") as f:
        maps = f.read()
    except OSError:
      return "glibc"
  return next((name for name in _OTHER_ALLOCATORS if f"lib{name}" in maps), "glibc")
