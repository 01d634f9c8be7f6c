"""A refused run leaves the workdir exactly as it found it, and a workdir holds one live run."""

import fcntl
import os
import shutil
import subprocess
import sys

import pytest
from conftest import TINY_EXPERIMENT, gptjax, run_stage, tiny_config, with_tokenizer

from gptjax import workdir as workdir_lib
from gptjax.errors import UserError


def snapshot(path) -> dict | None:
  """Every folder and file under `path` with its bytes; None if `path` does not exist."""
  if not os.path.exists(path):
    return None
  found = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), path)] = "<dir>"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        found[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return found


@pytest.mark.parametrize("override", ["--config.model.num_heads=5",
                                      "--config.train.batch_size=0",
                                      "--config.model.d_model=0"])
def test_a_refused_config_creates_no_workdir_and_the_corrected_one_is_not_blocked(
    tmp_path, override):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  out = gptjax("train", "--config", experiment, "--workdir", tmp_path / "run", override)
  assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert not (tmp_path / "run").exists()


def _refuse(config, workdir, mesh=None):
  before = snapshot(workdir)
  with pytest.raises(ValueError):  # UserError (or, for data errors, still a ValueError).
    run_stage(config, workdir, mesh=mesh)
  assert snapshot(workdir) == before, "a refused run changed the workdir"


@pytest.mark.parametrize("key, value", [("eval_split", "no_such_split"),
                                        ("train_split", "no_such_split")])
def test_a_missing_split_is_refused_before_config_json_is_written(
    tmp_path, tfds_data_dir, tiny_tokenizer_file, key, value):
  config = tiny_config(tfds_data_dir)
  config.data[key] = value
  _refuse(config, with_tokenizer(tmp_path / "run", tiny_tokenizer_file))


def test_a_refused_rerun_leaves_the_earlier_run_byte_for_byte(tmp_path, tfds_data_dir,
                                                             trained_workdir):
  run = shutil.copytree(trained_workdir, tmp_path / "run")
  config = tiny_config(tfds_data_dir)
  config.model.max_len = 64
  config.train.steps = 6
  config.data.eval_split = "no_such_split"
  _refuse(config, run)
  config.data.eval_split = "validation"
  config.train.batch_size = 6  # Not divisible by 4 data-parallel devices.
  from conftest import make_mesh
  _refuse(config, run, mesh=make_mesh(data=4))


def test_a_missing_dataset_trains_no_tokenizer_and_creates_nothing(tmp_path, tfds_data_dir):
  config = tiny_config(tfds_data_dir)
  config.data.dataset = "no_such_dataset"
  _refuse(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_workdir_in_use_by_a_live_process_is_refused(tmp_path, tfds_data_dir,
                                                      tiny_tokenizer_file):
  run = with_tokenizer(tmp_path / "run", tiny_tokenizer_file)
  fd = os.open(run, os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX)  # What a training process holds.
  try:
    before = snapshot(run)
    with pytest.raises(UserError, match="is in use"):
      run_stage(tiny_config(tfds_data_dir), run)
    assert snapshot(run) == before
  finally:
    os.close(fd)


HOLD_LOCK = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)")


def test_a_killed_run_does_not_leave_its_workdir_locked(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  lock = workdir_lib.Lock(str(run))
  with pytest.raises(UserError, match="is in use"):
    lock.acquire()
  holder.kill()  # SIGKILL: no cleanup runs.
  holder.wait()
  lock.acquire()
  lock.release()
  assert os.listdir(run) == [], "the lock writes no file"


def test_a_pipeline_whose_later_stage_lacks_its_dataset_writes_nothing(tmp_path, tfds_data_dir):
  import ml_collections
  from conftest import run_pipeline

  config = ml_collections.ConfigDict()
  config.stages = ("pretrain", "dialogue")
  config.tokenizer_stage = "pretrain"
  config.pretrain = tiny_config(tfds_data_dir)
  config.dialogue = tiny_config(tfds_data_dir)
  config.dialogue.stage = "dialogue"
  config.dialogue.data.update(kind="dialogue", dataset="schema_guided_dialogue",
                              eval_split="no_such_split")
  with pytest.raises(UserError, match="no_such_split"):
    run_pipeline(config, tmp_path / "run")
  assert not (tmp_path / "run").exists(), "the pretraining stage ran before the refusal"
