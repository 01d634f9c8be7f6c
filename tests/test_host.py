"""Process settings (gptjax/host.py): the XLA flags and glibc tunable the command line sets."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_EXPERIMENT

from gptjax import host
from gptjax.errors import UserError



def test_xla_flags_put_the_users_own_flags_last():
  assert host.xla_flags("auto", "") == host.CPU_XLA_FLAGS
  assert host.xla_flags("", "--a=1") == "--a=1"
  assert host.xla_flags("--b=2", "--a=1") == "--b=2 --a=1"  # XLA: the last one wins.
  mine = f"--xla_force_host_platform_device_count=8 {host.CPU_XLA_FLAGS}"
  assert host.xla_flags("auto", mine) == mine  # Never twice.


def test_glibc_tunables_keep_the_users_own():
  assert host.glibc_tunables(True, "") == "glibc.malloc.hugetlb=1"
  assert host.glibc_tunables(True, "glibc.malloc.arena_max=2") == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert host.glibc_tunables(True, "glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
  assert host.glibc_tunables(False, "x=1") == "x=1"


def test_allocator_preloads_jemalloc_where_found_and_keeps_your_settings(monkeypatch):
  for name in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES"):
    monkeypatch.delenv(name, raising=False)
  env = host.settings(True, "auto", "auto", jemalloc="libjemalloc.so.2")
  assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["MALLOC_CONF"] == host.JEMALLOC_CONF
  assert "GLIBC_TUNABLES" not in env  # glibc's malloc tunable is moot under jemalloc.
  assert "LD_PRELOAD" not in host.settings(True, "auto", "auto", jemalloc=None)  # Not here.
  assert "LD_PRELOAD" not in host.settings(True, "auto", "glibc", jemalloc="libjemalloc.so.2")
  monkeypatch.setenv("MALLOC_CONF", "narenas:1")
  monkeypatch.setenv("LD_PRELOAD", "libother.so libjemalloc.so.2")
  env = host.settings(True, "auto", "jemalloc", jemalloc="libjemalloc.so.2")
  assert env["LD_PRELOAD"] == "libjemalloc.so.2 libother.so" and "MALLOC_CONF" not in env
  # "auto" keeps an allocator the environment preloads already (TPU VM images: tcmalloc).
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc.so.4")
  assert "LD_PRELOAD" not in host.settings(True, "auto", "auto", jemalloc="libjemalloc.so.2")
  assert host.settings(True, "auto", "jemalloc", jemalloc="libjemalloc.so.2")[
      "LD_PRELOAD"] == "libjemalloc.so.2 /usr/lib/libtcmalloc.so.4"
  assert "GLIBC_TUNABLES" not in host.settings(True, "auto", "glibc", jemalloc=None)  # Moot.
  with pytest.raises(UserError, match="apt-get install libjemalloc2"):
    host.settings(True, "auto", "jemalloc", jemalloc=None)
  with pytest.raises(UserError, match="host.allocator='tcmalloc' is not one of"):
    host.settings(True, "auto", "tcmalloc", jemalloc=None)


@pytest.mark.slow
@pytest.mark.skipif(not host.hugepages_supported(), reason="needs Linux, glibc and THP")
def test_command_line_restarts_itself_with_huge_pages(tmp_path):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", "LD_PRELOAD", "MALLOC_CONF")}

  def report(*overrides):
    out = subprocess.run([sys.executable, "-m", "gptjax", "bench", "train", "--config",
                          str(experiment), "--steps", "1", "--torch", "off", *overrides],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)

  glibc = report("--config.host.allocator=glibc")
  assert glibc["hugepages"] and glibc["xla_flags"] == host.CPU_XLA_FLAGS
  assert glibc["allocator"] == "glibc"
  off = report("--config.host.allocator=glibc", "--config.host.hugepages=False",
               "--config.host.xla_cpu_flags=")
  assert not off["hugepages"] and off["xla_flags"] == ""
  # The default: jemalloc where installed (.ci/run installs it), preloaded by the restart.
  default = report()
  assert default["allocator"] == ("jemalloc" if host.jemalloc_library() else "glibc")
  assert default["hugepages"] == (default["allocator"] == "glibc")


def test_allocator_in_use_names_the_malloc_library_in_the_memory_maps():
  line = "7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/{}\n"
  cases = {"libtcmalloc_minimal.so.4": "tcmalloc", "libmimalloc.so.2": "mimalloc",
           "libjemalloc.so.2": "jemalloc", "libc.so.6": "glibc"}
  for library, name in cases.items():
    assert host.allocator_in_use(line.format("libpython3.11.so") + line.format(library)) == name
