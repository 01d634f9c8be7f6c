"""The dialogue stage: handoff from pretraining, freezing, early stopping, resume, pipeline."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import (ROOT, TINY_EXPERIMENT, compile_programs, gptjax, make_mesh, run_pipeline,
                      run_stage, tiny_config, tiny_dialogue_config, with_tokenizer, write_chats)

from gptjax import checkpoint as ckpt_lib
from gptjax import evaluate
from gptjax import pipeline
from gptjax import train as train_lib
from gptjax import workdir as workdir_lib



@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tfds_data_dir, tiny_tokenizer_file):
  """A 3-step tiny pretraining run (its workdir)."""
  workdir = with_tokenizer(tmp_path_factory.mktemp("pretrain") / "run", tiny_tokenizer_file)
  config = tiny_config(tfds_data_dir)
  config.train.steps = 3
  run_stage(config, str(workdir), mesh=make_mesh(data=2))
  return str(workdir)


@pytest.fixture
def chats(tmp_path):
  return write_chats(tmp_path / "train.jsonl", 40), write_chats(tmp_path / "dev.jsonl", 8, 1)


def _params(workdir, step=None):
  config = workdir_lib.read_config(workdir)
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True)
  abstract = compile_programs(config, make_mesh(data=2)).abstract_state().params
  return checkpoints.restore_params(checkpoints.resolve(step), abstract)


def _start_params(config, workdir, mesh):
  """The parameters a stage of `config` in a fresh `workdir` starts training from."""
  from gptjax import config as config_lib

  stage = workdir_lib.resolve(config_lib.stage_config(config), workdir)
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(stage.workdir), read_only=True)
  state, step = train_lib._start_state(stage, compile_programs(stage.config, mesh), checkpoints,
                                       None)
  assert step == 0
  return state.params


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_handoff_restores_exactly_the_pretrained_parameters(pretrained, chats, tmp_path):
  config = tiny_dialogue_config(*chats)
  config.init_from = pretrained
  config.train.steps = 1
  _assert_same(_start_params(config, str(tmp_path / "start"), make_mesh(data=2)),
               _params(pretrained))
  workdir = str(tmp_path / "dialogue")
  result = run_stage(config, workdir, mesh=make_mesh(data=2))
  assert int(result.state.step) == 1, "the step counter starts fresh"
  recorded = workdir_lib.read_config(workdir)
  assert (recorded.init_from, recorded.init_from_step) == (os.path.abspath(pretrained), "3")
  with open(os.path.join(workdir, "tokenizer.model"), "rb") as a, \
       open(os.path.join(pretrained, "tokenizer.model"), "rb") as b:
    assert a.read() == b.read(), "the tokenizer is copied from the earlier stage"
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {"loss", "assistant_loss"} <= set(rows[0]) and rows[0]["stage"] == "dialogue"
  assert {"loss", "assistant_loss"} <= set(rows[-1]) and rows[-1]["split"] == "eval"
  metrics = evaluate.eval_workdir(workdir, split=chats[0], mesh=make_mesh(data=2))
  assert metrics["split"] == chats[0] and metrics["assistant_tokens"] < metrics["tokens"]
  assert metrics["assistant_loss"] > 0


def test_handoff_refuses_another_model_shape(pretrained, chats, tmp_path):
  config = tiny_dialogue_config(*chats)
  config.init_from = pretrained
  config.model.d_ff = 128
  with pytest.raises(ValueError, match=r"another model shape \(model.d_ff: 64 -> 128\)"):
    run_stage(config, str(tmp_path / "dialogue"), mesh=make_mesh(data=2))
  assert not (tmp_path / "dialogue").exists()


def test_handoff_refuses_another_tokenizer(pretrained, chats, tmp_path):
  from gptjax import tokenizer as tokenizer_lib
  workdir = tmp_path / "dialogue"
  workdir.mkdir()
  other = tokenizer_lib.train_tokenizer(["another text entirely " * 50 + "".join(
      chr(c) for c in range(32, 127)) * 3], vocab_size=384)
  other.save(workdir / "tokenizer.model")
  config = tiny_dialogue_config(*chats)
  config.init_from = pretrained
  with pytest.raises(ValueError, match="differs from the tokenizer of init_from"):
    run_stage(config, str(workdir), mesh=make_mesh(data=2))


def test_a_resumed_dialogue_run_equals_an_uninterrupted_one(pretrained, chats, tmp_path):
  config = tiny_dialogue_config(*chats)
  config.init_from = pretrained
  straight = run_stage(config, str(tmp_path / "a"), mesh=make_mesh(data=2))
  config.train.steps = 2
  run_stage(config, str(tmp_path / "b"), mesh=make_mesh(data=2))
  config.train.steps = 4
  resumed = run_stage(config, str(tmp_path / "b"), mesh=make_mesh(data=2))
  assert int(resumed.state.step) == 4, "it resumes its own run, not the pretraining one"
  _assert_same(resumed.state.params, straight.state.params)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_provenance_it_started_with(pretrained, chats, tmp_path,
                                                           tfds_data_dir):
  # init_from relative, step "latest": resolved once to an absolute path and a step number.
  source = tmp_path / "pretrain"
  shutil.copytree(pretrained, source)
  workdir = tmp_path / "dialogue"
  flags = ["--config.stage=dialogue", "--config.data.kind=dialogue",
           f"--config.data.train_files={chats[0]}", f"--config.data.eval_files={chats[1]}",
           f"--config.init_from={os.path.relpath(source, ROOT)}"]
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  gptjax("train", "--config", experiment, "--workdir", workdir, "--config.train.steps=2",
         *flags, check=True)
  first = workdir_lib.read_config(str(workdir))
  assert (first.init_from, first.init_from_step) == (str(source), "3")
  # The source trains on: its latest is now step 5. A resume (a fresh process, the same
  # relative flags) continues the run from its own checkpoint and keeps what it recorded.
  config = tiny_config(tfds_data_dir)
  config.train.steps = 5
  run_stage(config, source, mesh=make_mesh(data=2))
  gptjax("train", "--config", experiment, "--workdir", workdir, "--config.train.steps=4",
         *flags, check=True)
  resumed = workdir_lib.read_config(str(workdir))
  assert (resumed.init_from, resumed.init_from_step) == (str(source), "3")
  assert resumed.train.steps == 4


@pytest.mark.parametrize("trainable, scan", [("top:1", False), ("top:1", True),
                                             ("no_embed", False)])
def test_frozen_parameters_do_not_move(pretrained, chats, tmp_path, trainable, scan):
  config = tiny_dialogue_config(*chats)
  config.model.scan_layers = scan
  config.train.update(trainable=trainable, steps=2)
  result = run_stage(config, str(tmp_path / "run"), mesh=make_mesh(data=2))
  programs = compile_programs(config, make_mesh(data=2))
  initial = jax.device_get(programs.init(jax.random.key(config.train.seed)).params)
  final = jax.device_get(result.state.params)
  if trainable == "no_embed":
    np.testing.assert_array_equal(final["embedding"], initial["embedding"])
    np.testing.assert_array_equal(final["pos_embedding"], initial["pos_embedding"])
    assert not np.array_equal(final["block_0"]["mlp"]["wi"], initial["block_0"]["mlp"]["wi"])
  elif scan:
    np.testing.assert_array_equal(final["blocks"]["mlp"]["wi"][0],
                                  initial["blocks"]["mlp"]["wi"][0])
    assert not np.array_equal(final["blocks"]["mlp"]["wi"][1],
                              initial["blocks"]["mlp"]["wi"][1])
  else:
    np.testing.assert_array_equal(final["block_0"]["attn"]["qkv"],
                                  initial["block_0"]["attn"]["qkv"])
    np.testing.assert_array_equal(final["pos_embedding"], initial["pos_embedding"])
    assert not np.array_equal(final["block_1"]["attn"]["qkv"],
                              initial["block_1"]["attn"]["qkv"])
    assert not np.array_equal(final["embedding"], initial["embedding"])  # Tied head trains.


def test_bad_trainable_is_a_clear_error(chats, tmp_path):
  config = tiny_dialogue_config(*chats)
  config.train.trainable = "top:5"
  with pytest.raises(ValueError, match=r"train.trainable='top:5'.*N <= 2 layers"):
    run_stage(config, str(tmp_path / "run"), mesh=make_mesh(data=2))


def test_early_stopping_stops_and_keeps_the_best(chats, tmp_path, monkeypatch):
  losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
  monkeypatch.setattr(train_lib.evaluate_lib, "evaluate",
                      lambda *a: {"loss": next(losses), "perplexity": 1.0, "tokens": 1.0})
  config = tiny_dialogue_config(*chats)
  config.train.update(steps=6, eval_every=1, checkpoint_every=100, patience=2, max_to_keep=1)
  workdir = str(tmp_path / "run")
  result = run_stage(config, workdir, mesh=make_mesh(data=2))
  assert result.stopped_early and int(result.state.step) == 4
  assert result.best_step == 2
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True)
  assert checkpoints.all_steps() == [2, 4]  # Latest (max_to_keep=1) and the best.
  assert checkpoints.resolve("best") == 2
  again = run_stage(config, workdir, mesh=make_mesh(data=2))
  assert again.stopped_early and int(again.state.step) == 4, "a rerun stays stopped"


@pytest.mark.slow
def test_pipeline_runs_both_stages_and_does_not_redo_finished_ones(tfds_data_dir, chats,
                                                                   tmp_path, capsys):
  import ml_collections
  config = ml_collections.ConfigDict()
  config.stages = ("pretrain", "dialogue")
  config.tokenizer_stage = "pretrain"
  config.pretrain = tiny_config(tfds_data_dir)
  config.pretrain.train.steps = 2
  config.dialogue = tiny_dialogue_config(*chats)
  config.dialogue.train.steps = 2
  config.num_samples = 2
  workdir = str(tmp_path / "demo")
  results = run_pipeline(config, workdir, mesh=make_mesh(data=2))
  assert set(results) == {"pretrain", "dialogue"}
  assert workdir_lib.read_config(os.path.join(workdir, "dialogue")).init_from == \
      os.path.join(workdir, "pretrain")
  pipeline.print_samples(pipeline.pipeline_config(config), workdir)
  out = capsys.readouterr().out
  assert out.count("--- held-out conversation") == 2 and "model:" in out

  config.dialogue.train.steps = 3  # A finished stage is not redone, even if asked for more.
  assert run_pipeline(config, workdir, mesh=make_mesh(data=2)) == {}


def test_handoff_restores_onto_another_mesh(pretrained, chats, tmp_path):
  config = tiny_dialogue_config(*chats)
  config.init_from = pretrained  # Trained on (data=2, fsdp=1, tensor=1).
  mesh = make_mesh(fsdp=2, tensor=2)
  params = _start_params(config, str(tmp_path / "dialogue"), mesh)
  qkv = params["block_0"]["attn"]["qkv"]
  assert qkv.sharding.mesh.shape == mesh.shape and len(qkv.sharding.device_set) == 4
  _assert_same(params, _params(pretrained))
