"""Resolving a stage writes nothing; preparing it writes on process 0 only."""

import json
import os
import shutil

import jax
import pytest
from conftest import tiny_config

from gptjax import config as config_lib
from gptjax import sharding
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError


def _stage_config(**changes):
  return config_lib.stage_config(tiny_config()).replace(**changes)


def test_resolve_writes_nothing_and_a_fresh_stage_trains_its_tokenizer(tmp_path):
  stage = workdir_lib.resolve(_stage_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  assert stage.workdir == str(tmp_path / "run") and not stage.resuming
  assert stage.init is None and stage.tokenizer_from is None


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "run").write_text("not a directory")
  with pytest.raises(UserError, match="is a file, not a directory"):
    workdir_lib.resolve(_stage_config(), str(tmp_path / "run"))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "not a gptjax workdir"),
])
def test_a_missing_init_source_is_refused(tmp_path, make, message):
  make(tmp_path / "source")
  config = _stage_config(init_from=str(tmp_path / "source"))
  with pytest.raises(UserError, match=message):
    workdir_lib.resolve(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_other_processes_wait_for_process_zero_and_write_nothing(tmp_path, monkeypatch,
                                                                 tiny_tokenizer_file):
  stage = workdir_lib.resolve(_stage_config(), str(tmp_path / "run"))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  waited = []

  def barrier(name):  # Process 0 writes the shared files while the others wait here.
    waited.append(name)
    os.makedirs(stage.workdir)
    shutil.copy(tiny_tokenizer_file, workdir_lib.tokenizer_path(stage.workdir))

  monkeypatch.setattr(sharding, "barrier", barrier)
  tokenizer = workdir_lib.prepare(
      stage, training_texts=lambda: pytest.fail("only process 0 trains the tokenizer"))
  assert waited and tokenizer.vocab_size == stage.config.model.vocab_size
  assert not os.path.exists(workdir_lib.config_path(stage.workdir)), "process 0 writes it"


def test_process_zero_writes_the_resolved_config_and_the_tokenizer(tmp_path,
                                                                   tiny_tokenizer_file):
  stage = workdir_lib.resolve(_stage_config(), str(tmp_path / "run"),
                              tokenizer_from=str(tiny_tokenizer_file))
  workdir_lib.prepare(stage)
  with open(workdir_lib.config_path(stage.workdir)) as f:
    assert config_lib.stage_config(json.load(f)) == stage.config
  with open(workdir_lib.tokenizer_path(stage.workdir), "rb") as a, \
       open(tiny_tokenizer_file, "rb") as b:
    assert a.read() == b.read()
