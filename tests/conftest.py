"""Test setup: 8 fake CPU devices (so sharding is exercised for real) and tiny shared fixtures.

XLA reads XLA_FLAGS when jax first initialises its backends, so the flag is set here, before
any test module imports jax.
"""

import os

from gptjax import host  # noqa: E402  (imports no jax)

# gptjax's CPU flags too, so tests run the kernels the command line runs (see
# tests/test_golden.py); and subprocesses start with the huge-page tunable, so the command line
# has no reason to re-execute itself (tests/test_bench.py checks that it would).
os.environ["XLA_FLAGS"] = host.xla_flags(
    "auto", os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
if host.hugepages_supported():
  os.environ["GLIBC_TUNABLES"] = host.glibc_tunables(True)
# Likewise the allocator the command line preloads where it is installed (host.allocator
# "auto"), for the `gptjax()` subprocesses only: other programs the tests start (Chromium)
# keep their own.
ALLOCATOR_ENV = {k: v for k, v in host.settings(True, "", "auto", host.jemalloc_library()).items()
                 if k in ("LD_PRELOAD", "MALLOC_CONF")}
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The checkout.
TOKENIZER_VOCAB = 384  # Tiny, but above SentencePiece's minimum for Shakespeare's characters.


@pytest.fixture(scope="session")
def tfds_data_dir():
  """The tfds data_dir holding prepared tiny_shakespeare (from TFDS_DATA_DIR)."""
  data_dir = os.environ.get("TFDS_DATA_DIR")
  if not data_dir or not os.path.isdir(os.path.join(data_dir, "tiny_shakespeare")):
    pytest.skip("needs prepared tfds datasets: set TFDS_DATA_DIR (CI uses ../shared/tfds) or "
                "run `python -m gptjax prepare --dataset tiny_shakespeare`")
  return data_dir


# A 2-layer, d_model 32 model on tiny_shakespeare, small enough for a CPU test: written as an
# experiment file so tests can also launch it through the command line.
TINY_EXPERIMENT = f'''
from gptjax import config as config_lib

def get_config():
  c = config_lib.base_config()
  c.model.update(vocab_size={TOKENIZER_VOCAB}, num_layers=2, num_heads=2, d_model=32, d_ff=64,
                 max_len=32)
  c.tokenizer.max_chars = 60_000
  c.data.update(seq_len=32, chunk_chars=400, eval_batches=2)
  c.train.update(steps=4, batch_size=8, warmup_steps=1, learning_rate=3e-3, log_every=1,
                 eval_every=2, checkpoint_every=2)
  return c
'''


def tiny_config(data_dir=None):
  """TINY_EXPERIMENT's config, reading tfds from `data_dir`."""
  namespace = {}
  exec(TINY_EXPERIMENT, namespace)  # pylint: disable=exec-used
  c = namespace["get_config"]()
  if data_dir:
    c.data.data_dir = data_dir
  return c


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory, tfds_data_dir):
  """A tokenizer trained once on a slice of tiny_shakespeare, saved to a file."""
  from gptjax import data, tokenizer

  docs = data.text_documents(data.load_source("tiny_shakespeare", "train", tfds_data_dir))
  tok = tokenizer.train_tokenizer(docs, vocab_size=TOKENIZER_VOCAB, max_chars=60_000)
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  tok.save(path)
  return path


def with_tokenizer(path, tiny_tokenizer_file):
  """Creates the directory `path` holding the shared tiny tokenizer (so a run skips training
  one) and returns `path`."""
  os.makedirs(path)
  shutil.copy(tiny_tokenizer_file, os.path.join(path, "tokenizer.model"))
  return path


@pytest.fixture
def workdir(tmp_path, tiny_tokenizer_file):
  """A fresh workdir with the shared tiny tokenizer already in place (skips its training)."""
  return str(with_tokenizer(tmp_path / "run", tiny_tokenizer_file))


def write_chats(path, count: int, seed: int = 0):
  """A JSONL file of `count` small customer-service conversations."""
  import json
  import random

  rng = random.Random(seed)
  cities = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Delhi"]
  with open(path, "w") as f:
    for _ in range(count):
      city, day = rng.choice(cities), rng.randint(1, 28)
      messages = [{"role": "user", "content": f"I need a hotel in {city}."},
                  {"role": "assistant", "content": "Which dates?"},
                  {"role": "user", "content": f"From March {day}."},
                  # Short: each exchange fits a row of the tiny config (seq_len 32), since a
                  # conversation is never split across rows.
                  {"role": "assistant", "content": f"Booked in {city}."}]
      f.write(json.dumps({"messages": messages}) + "\n")
  return str(path)


def tiny_dialogue_config(train_file, eval_file, data_dir=None):
  """tiny_config() as a dialogue stage on JSONL chat files."""
  c = tiny_config(data_dir)
  c.stage = "dialogue"
  c.data.update(kind="dialogue", train_files=str(train_file), eval_files=str(eval_file))
  return c


# The command line and the library both start from a ConfigDict turned into a StageConfig;
# tests edit ConfigDicts (tiny_config) and convert them with these.


def make_mesh(data=1, fsdp=1, tensor=1):
  """A mesh over the first data * fsdp * tensor fake devices."""
  import jax

  from gptjax import sharding

  n = data * fsdp * tensor
  return sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, jax.devices()[:n])


def compile_programs(config, mesh):
  """steps.compile_programs of a ConfigDict (or a StageConfig)."""
  from gptjax import config as config_lib
  from gptjax import steps

  if not isinstance(config, config_lib.StageConfig):
    config = config_lib.stage_config(config)
  return steps.compile_programs(config, mesh)


def train_steps(config, mesh, batch, steps: int):
  """(final state, per-step metrics), both on the host: `steps` train steps of a fresh state
  (seed 0) of `config` on `mesh`, each on the same `batch`."""
  import jax

  from gptjax import sharding

  programs = compile_programs(config, mesh)
  state = programs.init(jax.random.key(0))
  batch = sharding.global_batch(batch, programs.batch_sharding)
  history = []
  for _ in range(steps):
    state, metrics = programs.train_step(state, batch)
    history.append(metrics)
  return jax.device_get(state), jax.device_get(history)


def run_stage(config, workdir, mesh=None, progress=False):
  """Resolves a ConfigDict's stage in `workdir` and trains it, as `gptjax train` does."""
  from gptjax import config as config_lib
  from gptjax import train
  from gptjax import workdir as workdir_lib

  stage = workdir_lib.resolve(config_lib.stage_config(config), str(workdir))
  return train.train(stage, mesh=mesh, progress=progress)


def run_pipeline(config, workdir, mesh=None):
  """pipeline.run of a pipeline ConfigDict."""
  from gptjax import pipeline

  return pipeline.run(pipeline.pipeline_config(config), str(workdir), mesh=mesh, progress=False)


def gptjax(*args, stdin=None, env=None, check=False, timeout=600):
  """`python -m gptjax ARGS` from the checkout; a CompletedProcess with text output."""
  out = subprocess.run([sys.executable, "-m", "gptjax", *map(str, args)], input=stdin,
                       capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, **ALLOCATOR_ENV, **(env or {})})
  if check and out.returncode:
    raise AssertionError(f"gptjax {args} failed:\n{out.stdout}\n{out.stderr}")
  return out


def free_port() -> int:
  """A local TCP port free now (for a JAX coordinator the test's subprocesses start)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, tfds_data_dir, tiny_tokenizer_file):
  """A tiny model trained for 4 steps, with a 64-token context for chat histories."""
  path = with_tokenizer(tmp_path_factory.mktemp("trained") / "run", tiny_tokenizer_file)
  config = tiny_config(tfds_data_dir)
  config.model.max_len = 64
  run_stage(config, path)
  return str(path)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tfds_data_dir, tiny_tokenizer_file) -> dict[str, str]:
  """A tiny two-stage pipeline and a replies-only dialogue run from its pretraining."""
  import ml_collections

  root = tmp_path_factory.mktemp("trained_runs")
  paths = {"pipeline": str(root / "demo"), "replies_only": str(root / "replies_only")}
  chats = write_chats(root / "chats.jsonl", 40), write_chats(root / "dev.jsonl", 8, 1)
  mesh = make_mesh(data=2)
  config = ml_collections.ConfigDict()
  config.stages, config.tokenizer_stage = ("pretrain", "dialogue"), "pretrain"
  config.pretrain = tiny_config(tfds_data_dir)
  config.dialogue = tiny_dialogue_config(*chats)
  with_tokenizer(paths["pipeline"], tiny_tokenizer_file)
  run_pipeline(config, paths["pipeline"], mesh=mesh)

  replies = tiny_dialogue_config(*chats)
  replies.init_from = os.path.join(paths["pipeline"], "pretrain")
  replies.dialogue.history_weight = 0.0
  run_stage(replies, paths["replies_only"], mesh=mesh)
  return paths
