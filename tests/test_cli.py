"""The command line: override errors before anything starts, and a train/resume round trip."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ALLOCATOR_ENV, ROOT, TINY_EXPERIMENT, gptjax, with_tokenizer

EXPERIMENT = os.path.join(ROOT, "experiments", "shakespeare_pretrain.py")



@pytest.mark.parametrize("override, key", [
    ("--config.train.stepz=5", "stepz"),
    ("--config.train.steps=abc", "steps"),
])
def test_bad_override_names_the_key_and_starts_nothing(tmp_path, override, key):
  out = gptjax("train", "--config", EXPERIMENT, "--workdir", str(tmp_path / "run"), override)
  assert out.returncode != 0
  assert key in out.stderr
  assert not (tmp_path / "run").exists()


def test_unknown_command_is_a_usage_error():
  out = gptjax("trian")
  assert out.returncode != 0 and "Expected one command" in out.stderr


def test_prepare_without_a_dataset_says_what_is_missing():
  out = gptjax("prepare")
  assert out.returncode != 0 and "needs --dataset" in out.stderr


@pytest.mark.parametrize("args, flag", [
    (["train", "--config", EXPERIMENT, "--workdir", "unused", "--steps", "100"], "--steps"),
    (["eval", "--workdir", "unused", "--temperature", "0"], "--temperature"),
    (["prepare", "--dataset", "x", "--workdir", "unused"], "--workdir"),
    (["sample", "--workdir", "unused", "--config", EXPERIMENT, "--prompt", "a"], "--config"),
])
def test_a_flag_the_command_does_not_take_is_refused(args, flag, tmp_path):
  out = gptjax(*args)
  assert out.returncode == 1, out.stderr
  assert f"does not take {flag}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
  assert not os.path.exists(os.path.join(ROOT, "unused"))


def test_a_bad_step_names_the_flag(tmp_path):
  out = gptjax("eval", "--workdir", tmp_path, "--step", "banana")
  assert out.returncode == 1 and "--step='banana' is not a checkpoint" in out.stderr


def test_a_pipeline_config_given_to_train_says_which_command_runs_it(tmp_path):
  out = gptjax("train", "--config", os.path.join(ROOT, "experiments", "chat_demo.py"),
               "--workdir", tmp_path / "run")
  assert out.returncode == 1 and "is a pipeline config" in out.stderr
  out = gptjax("pipeline", "--config", EXPERIMENT, "--workdir", tmp_path / "run")
  assert out.returncode == 1 and "is a single-stage config" in out.stderr
  assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback_and_says_it_is_one(tmp_path):
  # An internal error (here forced into `eval`) is not mistaken for bad input.
  code = ("import sys; from gptjax import evaluate, cli; "
          "evaluate.eval_workdir = lambda *a, **k: {}['missing']; "
          "sys.argv = ['gptjax', *sys.argv[1:]]; cli.run()")
  # The allocator already preloaded: a restart of the command line would drop the patch.
  out = subprocess.run([sys.executable, "-c", code, "eval", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, **ALLOCATOR_ENV})
  assert out.returncode == 2
  assert "Traceback" in out.stderr and "KeyError: 'missing'" in out.stderr
  assert "this is a bug in gptjax" in out.stderr




@pytest.mark.slow
def test_train_writes_the_workdir_contract_and_resumes(tmp_path, tfds_data_dir,
                                                       tiny_tokenizer_file):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  workdir = with_tokenizer(tmp_path / "run", tiny_tokenizer_file)
  out = gptjax("train", "--config", str(experiment), "--workdir", str(workdir),
               f"--config.data.data_dir={tfds_data_dir}", check=True)
  assert "Done: pretrain at step 4" in out.stdout
  assert {"config.json", "tokenizer.model", "checkpoints", "metrics.jsonl",
          "tensorboard"} <= set(os.listdir(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 4

  out = gptjax("train", "--config", str(experiment), "--workdir", str(workdir),
               f"--config.data.data_dir={tfds_data_dir}", "--config.train.steps=6", check=True)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6], "a rerun resumes after step 4"
  assert all({"lr", "grad_norm", "tokens_per_sec", "stage"} <= set(r) for r in train_rows)
  assert {r["step"] for r in rows if r["split"] == "eval"} == {2, 4, 6}
  assert rows[-1]["loss"] < rows[0]["loss"]

  out = gptjax("eval", "--workdir", str(workdir), "--json", check=True)
  metrics = json.loads(out.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 6 and metrics["split"] == "validation"
  assert abs(metrics["loss"] - rows[-1]["loss"]) < 1e-4, "eval reproduces the last eval row"
  out = gptjax("eval", "--workdir", str(workdir), "--step", "2", "--split", "test", check=True)
  assert "step=2 split=test loss=" in out.stdout


def test_console_script_is_installed():
  script = shutil.which("gptjax", path=os.path.dirname(sys.executable))
  assert script, "pip install should put a `gptjax` script beside python"
  out = subprocess.run([script, "--helpfull"], capture_output=True, text=True, timeout=120)
  assert "--workdir" in out.stdout
