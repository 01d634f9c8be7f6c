"""SIGTERM and SIGINT during a real `python -m gptjax train` / `pipeline`: the step in flight is
saved, the exit status says which signal, and a rerun continues as if never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY_EXPERIMENT, free_port, gptjax, with_tokenizer

STEPS = 150  # Long enough that the signal lands mid-run, short enough to rerun quickly.
LONG_RUN = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1000",
            "--config.train.eval_every=0"]


def _rows(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _signal_mid_run(args, workdir, *signums, pause=0.05):
  """Starts `gptjax ARGS`, sends `signums` once training has logged two steps; (rc, stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", "gptjax", *map(str, args)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while len(_rows(workdir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be signalled: raise STEPS"
  for signum in signums:
    proc.send_signal(signum)
    time.sleep(pause)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def _train_losses(workdir) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in _rows(workdir) if r["split"] == "train"]


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_a_rerun_matches_an_uninterrupted_run(
    tmp_path, tfds_data_dir, tiny_tokenizer_file):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  flags = ["--config", experiment, f"--config.data.data_dir={tfds_data_dir}", *LONG_RUN]
  stopped = with_tokenizer(tmp_path / "stopped", tiny_tokenizer_file)
  # A second SIGTERM lands while the first one's checkpoint is being written.
  rc, err = _signal_mid_run(["train", "--workdir", stopped, *flags], stopped,
                            signal.SIGTERM, signal.SIGTERM, pause=0.01)
  assert rc == 143, err
  step = _train_losses(stopped)[-1][0]
  assert 2 <= step < STEPS
  assert f"SIGTERM stopped pretrain after step {step}" in err and "Rerun the same" in err
  assert os.listdir(stopped / "checkpoints") == [str(step)], "the stopped step is saved"

  gptjax("train", "--workdir", stopped, *flags, check=True)
  whole = with_tokenizer(tmp_path / "whole", tiny_tokenizer_file)
  gptjax("train", "--workdir", whole, *flags, check=True)
  resumed, reference = _train_losses(stopped), _train_losses(whole)
  assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
  assert resumed == reference, "stopping and resuming changed the losses"


PIPELINE = TINY_EXPERIMENT + '''
import ml_collections

def get_pipeline():
  p = ml_collections.ConfigDict()
  p.stages, p.tokenizer_stage = ("pretrain",), "pretrain"
  p.pretrain = get_config()
  return p
'''


@pytest.mark.slow
def test_sigint_stops_a_pipeline_stage_cleanly_and_a_rerun_finishes_it(
    tmp_path, tfds_data_dir, tiny_tokenizer_file):
  experiment = tmp_path / "pipe.py"
  experiment.write_text(PIPELINE.replace("def get_config():", "def _stage():")
                        .replace("get_config()", "_stage()")
                        .replace("def get_pipeline():", "def get_config():"))
  root = with_tokenizer(tmp_path / "pipe", tiny_tokenizer_file)  # The shared tokenizer.
  flags = ["--config", experiment, *(f.replace("--config.", "--config.pretrain.")
                                     for f in [f"--config.data.data_dir={tfds_data_dir}",
                                               *LONG_RUN])]
  rc, err = _signal_mid_run(["pipeline", "--workdir", root, *flags], root / "pretrain",
                            signal.SIGINT)
  assert rc == 130, err
  assert "SIGINT stopped pretrain" in err and "Traceback" not in err
  assert not (root / "pipeline.json").exists(), "an interrupted stage is not finished"
  step = _train_losses(root / "pretrain")[-1][0]
  assert os.listdir(root / "pretrain" / "checkpoints") == [str(step)]

  out = gptjax("pipeline", "--workdir", root, *flags, check=True)
  assert f"Done: pretrain at step {STEPS}" in out.stdout
  assert [s for s, _ in _train_losses(root / "pretrain")] == list(range(1, STEPS + 1))
  assert json.loads((root / "pipeline.json").read_text())["finished"] == ["pretrain"]


def test_save_every_minutes_checkpoints_at_logging_steps_between_step_based_ones(
    tmp_path, tfds_data_dir, tiny_tokenizer_file):
  from conftest import run_stage, tiny_config

  config = tiny_config(tfds_data_dir)
  config.train.update(steps=4, checkpoint_every=1000, eval_every=0, log_every=1,
                      max_to_keep=5, save_every_minutes=1e-9)  # Always due: every log step.
  run = with_tokenizer(tmp_path / "run", tiny_tokenizer_file)
  run_stage(config, run)
  assert sorted(map(int, os.listdir(run / "checkpoints"))) == [1, 2, 3, 4]
  config.train.save_every_minutes = 0.0  # Off: only the final checkpoint.
  other = with_tokenizer(tmp_path / "other", tiny_tokenizer_file)
  run_stage(config, other)
  assert os.listdir(other / "checkpoints") == ["4"]


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_one_is_preempted(tmp_path, tfds_data_dir,
                                                              tiny_tokenizer_file):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  run = with_tokenizer(tmp_path / "run", tiny_tokenizer_file)
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "gptjax", "train", "--config", str(experiment), "--workdir",
       str(run), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i), f"--config.data.data_dir={tfds_data_dir}", *LONG_RUN],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  deadline = time.monotonic() + 300
  while len(_rows(run)) < 2 and time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), "a process ended before the signal"
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)  # A preemption notice reaches one worker only.
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs
  (step,) = os.listdir(run / "checkpoints")
  for out in outs:
    assert f"SIGTERM stopped pretrain after step {step};" in out
