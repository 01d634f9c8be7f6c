"""Damaged state on disk: a checkpoint, tokenizer.model, config.json or metrics.jsonl that was
cut short or lost is named in one error, or recovered (never deleted)."""

import json
import os
import shutil

import pytest
from conftest import gptjax, run_stage, tiny_config

from gptjax import checkpoint as ckpt_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError


def _truncate(path, keep=0.5):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def _state_files(step_dir):
  found = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    found += [os.path.join(root, n) for n in files if os.path.basename(root) == "d"]
  return found


def damage(step_dir, kind: str):
  """Damages a checkpoint step folder the way a crash or a bad disk would."""
  if kind == "missing_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "truncated_metadata":
    _truncate(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  elif kind == "truncated_data_position":
    (data,) = [n for n in os.listdir(os.path.join(step_dir, "data")) if n.endswith(".json")]
    _truncate(os.path.join(step_dir, "data", data))
  elif kind == "truncated_arrays":  # Only a restore can notice this one.
    for path in _state_files(step_dir):
      _truncate(path, keep=0.3)
  elif kind == "half_written":  # Only a folder begun, outside Orbax's atomic rename.
    shutil.rmtree(step_dir)
    os.makedirs(os.path.join(step_dir, "state"))
  else:
    raise ValueError(kind)


KINDS = ["missing_metadata", "truncated_metadata", "truncated_data_position", "half_written"]


@pytest.fixture
def run(tmp_path, trained_workdir):
  """A copy of the tiny trained run (checkpoints 2 and 4) to damage."""
  return str(shutil.copytree(trained_workdir, tmp_path / "run"))


@pytest.mark.parametrize("kind", KINDS)
def test_latest_skips_a_damaged_step_and_naming_it_is_an_error(run, kind, capfd):
  damage(os.path.join(run, "checkpoints", "4"), kind)
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(run), read_only=True)
  try:
    assert checkpoints.resolve(None) == 2
    assert "checkpoint 4" in capfd.readouterr().err
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match="Checkpoint 4 .* is damaged: "):
      checkpoints.resolve("4")
  finally:
    checkpoints.close()
  assert os.path.isdir(os.path.join(run, "checkpoints", "4")), "never deleted"


def test_a_step_whose_arrays_are_cut_short_is_an_error_naming_it(run):
  damage(os.path.join(run, "checkpoints", "4"), "truncated_arrays")
  out = gptjax("eval", "--workdir", run, "--step", "4")
  assert out.returncode == 1, out.stderr
  assert "Checkpoint 4" in out.stderr and "is damaged" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  # Readable: TensorStore's JSON spec (several KB) is cut from the reason.
  assert len(out.stderr) < 800 and "tensorstore_spec" not in out.stderr, out.stderr


def test_readers_fall_back_from_a_latest_step_whose_arrays_are_cut_short(run, monkeypatch):
  from gptjax import evaluate, generate

  damage(os.path.join(run, "checkpoints", "4"), "truncated_arrays")
  open_managers = set()
  init, close = ckpt_lib.Checkpoints.__init__, ckpt_lib.Checkpoints.close
  monkeypatch.setattr(ckpt_lib.Checkpoints, "__init__",
                      lambda self, *a, **k: (open_managers.add(self), init(self, *a, **k))[1])
  monkeypatch.setattr(ckpt_lib.Checkpoints, "close",
                      lambda self: (open_managers.discard(self), close(self))[1])
  metrics = evaluate.eval_workdir(run)
  assert metrics["step"] == 2
  generator, _ = generate.load(run)
  assert generator.step == 2
  assert ckpt_lib.latest_step(workdir_lib.checkpoint_dir(run)) == 4  # Judged from metadata.
  assert not open_managers, "a reader left a checkpoint manager (and its threads) open"
  out = gptjax("sample", "--workdir", run, "--prompt", "ROMEO:", "--max_new_tokens", "4")
  assert out.returncode == 0, out.stderr
  assert "checkpoint 4" in out.stderr and "is damaged" in out.stderr
  assert os.path.isdir(os.path.join(run, "checkpoints", "4")), "never moved or deleted"


@pytest.mark.parametrize("kind", ["truncated_arrays", "missing_metadata"])
def test_a_resumed_run_falls_back_to_the_newest_intact_step(run, kind, tfds_data_dir, capfd):
  damage(os.path.join(run, "checkpoints", "4"), kind)
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write('{"step": 4, "stage": "pretr')  # A torn last line: a run killed mid-write.
  config = tiny_config(tfds_data_dir)
  config.model.max_len = 64
  config.train.steps = 6
  run_stage(config, run)
  assert "checkpoint 4" in capfd.readouterr().err
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4", "6"]
  assert os.listdir(os.path.join(run, "checkpoints.damaged")) == ["4"], "kept aside"
  with open(os.path.join(run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]  # Every line parses: the torn one is gone.
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_every_step_damaged_is_an_error_not_a_fresh_start(run, tfds_data_dir):
  for step in ("2", "4"):
    damage(os.path.join(run, "checkpoints", step), "missing_metadata")
  config = tiny_config(tfds_data_dir)
  config.model.max_len = 64
  config.train.steps = 6
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="damaged"):
    run_stage(config, run)
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]


@pytest.mark.parametrize("name", ["tokenizer.model", "config.json"])
def test_a_damaged_workdir_file_is_one_error_naming_it(run, name):
  _truncate(os.path.join(run, name), keep=0.4)
  out = gptjax("sample", "--workdir", run, "--prompt", "ROMEO:")
  assert out.returncode == 1, out.stderr
  assert name in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_damaged_tokenizer_is_named_when_resuming(run, tfds_data_dir):
  _truncate(os.path.join(run, "tokenizer.model"), keep=0.4)
  config = tiny_config(tfds_data_dir)
  config.model.max_len = 64
  with pytest.raises(UserError, match="tokenizer.model is not a readable tokenizer"):
    run_stage(config, run)


@pytest.fixture
def tiny_disk(tmp_path):
  """A mount point for a small tmpfs (skips where mounting is not allowed)."""
  import subprocess

  point = tmp_path / "disk"
  point.mkdir()

  def mount(size: int):
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    return point

  yield mount
  subprocess.run(["umount", str(point)], capture_output=True, check=False)


def test_a_full_disk_stops_the_run_with_one_error_and_keeps_earlier_checkpoints(
    trained_workdir, tfds_data_dir, tiny_disk):
  size = sum(-(-os.path.getsize(os.path.join(root, n)) // 4096) * 4096  # tmpfs pages.
             for root, _, names in os.walk(trained_workdir) for n in names)
  run = str(shutil.copytree(trained_workdir, tiny_disk(size + 150_000) / "run"))
  config = tiny_config(tfds_data_dir)
  config.model.max_len = 64
  config.train.steps = 6  # Checkpoint 6 does not fit.
  with pytest.raises(ckpt_lib.CheckpointWriteError,
                     match=r"Could not write checkpoint 6 .*earlier checkpoints \(steps: 2, 4\)"):
    run_stage(config, run)
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(run), read_only=True)
  try:
    assert checkpoints.all_steps() == [2, 4]
    assert all(checkpoints.damage(step) is None for step in (2, 4))
  finally:
    checkpoints.close()
