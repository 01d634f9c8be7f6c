"""Sequence classification (data.kind="classify", gptjax/classify.py)."""

import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gptjax, make_mesh, run_stage, tiny_config, with_tokenizer
from test_robust_damage import damage

from gptjax import checkpoint as ckpt_lib
from gptjax import classify, runs
from gptjax import config as config_lib
from gptjax import evaluate as evaluate_lib
from gptjax import metrics as metrics_lib
from gptjax import train as train_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError

LABELS = ("hotel", "flight", "table")


def test_head_reads_the_last_real_token_not_padding():
  hidden_BLD = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
  segment_ids_BL = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
  last = classify.pooled(hidden_BLD, segment_ids_BL, "last")
  np.testing.assert_array_equal(last[0], hidden_BLD[0, 2])  # Not position -1 (padding).
  np.testing.assert_array_equal(last[1], hidden_BLD[1, 5])
  mean = classify.pooled(hidden_BLD, segment_ids_BL, "mean")
  np.testing.assert_allclose(mean[0], hidden_BLD[0, :3].mean(0))


def test_rows_keep_the_label_and_pad_with_segment_zero():
  row = classify.to_row(np.asarray([1, 7, 9], np.int32), 2, 6)
  np.testing.assert_array_equal(row["inputs"], [1, 7, 9, 0, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0, 0])
  assert (row["targets"] == 2).all() and (row["weights"] == 1).all()


def test_labels_as_strings_or_class_indices():
  assert classify.check_example("book it", "flight", LABELS) == ("book it", 1)
  assert classify.check_example(b"book it", np.int64(2), LABELS) == ("book it", 2)
  assert classify.check_example("x", b"hotel", LABELS) == ("x", 0)


def _write(path, records):
  with open(path, "w") as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
  return str(path)


def test_bad_records_are_skipped_and_counted_or_stop_with_strict(tmp_path):
  path = _write(tmp_path / "bad.jsonl", [
      {"text": "a room please", "label": "hotel"},
      {"text": "no label here"},
      {"text": "a seat", "label": "train"},
      {"text": "   ", "label": "hotel"},
      {"text": 42, "label": "hotel"},
      "{not json",
      {"text": "fly me", "label": "flight"},
  ])
  found, report = classify.read_jsonl(path, LABELS, strict=False)
  assert found == [("a room please", 0), ("fly me", 1)]
  assert report.skipped == 5 and report.used == 2
  assert f"{path}:2: no label" in report.summary()
  assert "not one of classify.labels" in report.problems[1]
  with pytest.raises(UserError, match=rf"{path}:2: no label.*data.strict"):
    classify.read_jsonl(path, LABELS, strict=True)


def test_classify_config_is_checked():
  c = tiny_config()
  c.data.kind = "classify"
  c.classify.labels = "only_one"
  with pytest.raises(UserError, match="classify.labels"):
    config_lib.stage_config(c)
  c.classify.update(labels="a,b", pool="max")
  with pytest.raises(UserError, match="classify.pool"):
    config_lib.stage_config(c)


def _examples(count, seed):
  rng = random.Random(seed)
  words = {"hotel": ["a room", "a hotel", "a bed"], "flight": ["a flight", "a plane seat"],
           "table": ["a table", "dinner"]}
  cities = ["Paris", "Rome", "Lima", "Oslo"]
  out = []
  for _ in range(count):
    label = rng.choice(LABELS)
    out.append({"text": f"I need {rng.choice(words[label])} in {rng.choice(cities)} for "
                        f"{rng.randint(2, 9)} people.", "label": label})
  return out


@pytest.mark.slow
def test_a_learnable_task_reaches_full_accuracy(tmp_path, workdir):
  train = _write(tmp_path / "train.jsonl", _examples(200, 0))
  dev = _write(tmp_path / "dev.jsonl", _examples(40, 1))
  c = tiny_config()
  c.stage = "classify"
  c.data.update(kind="classify", train_files=train, eval_files=dev, eval_batches=0)
  c.classify.labels = ",".join(LABELS)
  c.train.update(steps=60, batch_size=16, learning_rate=3e-3, warmup_steps=5, eval_every=30,
                 checkpoint_every=30, log_every=10)
  result = run_stage(c, workdir, mesh=make_mesh(data=2))
  assert result.last_eval["accuracy"] >= 0.95, result.last_eval
  rows = metrics_lib.read_rows(f"{workdir}/metrics.jsonl")
  assert all("accuracy" in r for r in rows)
  df = runs.load(workdir)  # The notebooks' loader carries the new columns.
  assert df[df["split"] == "eval"]["macro_f1"].notna().all()

  metrics = evaluate_lib.eval_workdir(workdir, mesh=make_mesh())
  assert metrics["accuracy"] >= 0.95 and metrics["macro_f1"] >= 0.9
  assert metrics["labels"] == list(LABELS)
  matrix = np.asarray(metrics["confusion"])
  assert matrix.shape == (3, 3) and matrix.sum() == 40

  out = gptjax("classify", "--workdir", workdir, "--text", "I need a plane seat in Oslo for 3 people.",
               "--text", "I need dinner in Rome for 4 people.", "--json", check=True)
  results = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r["label"] for r in results] == ["flight", "table"]
  assert set(results[0]["probabilities"]) == set(LABELS)
  assert sum(results[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def _classify_config(tmp_path):
  """A tiny classification stage on JSONL files in `tmp_path`: 6 steps, an eval and a
  checkpoint every 2, with dropout (so resuming must also restore the step's randomness)."""
  c = tiny_config()
  c.stage = "classify"
  c.data.update(kind="classify", train_files=_write(tmp_path / "train.jsonl", _examples(64, 0)),
                eval_files=_write(tmp_path / "dev.jsonl", _examples(16, 1)), eval_batches=0)
  c.classify.labels = ",".join(LABELS)
  c.model.dropout = 0.1
  c.train.update(steps=6, batch_size=8, eval_every=2, checkpoint_every=2, log_every=1)
  return c


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, tiny_tokenizer_file):
  """(config, workdir, final params on the host) of a tiny trained classification run with
  checkpoints 2, 4 and 6."""
  root = tmp_path_factory.mktemp("classify")
  config = _classify_config(root)
  workdir = str(with_tokenizer(root / "run", tiny_tokenizer_file))
  result = run_stage(config, workdir, mesh=make_mesh(data=2))
  return config, workdir, jax.device_get(result.state.params)


def _rows(workdir):
  """metrics.jsonl without the wall-clock fields."""
  return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_sec")}
          for r in metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))]


def test_a_killed_classification_run_resumes_exactly(classify_run, tmp_path):
  config, workdir, params = classify_run
  killed = str(tmp_path / "killed")
  shutil.copytree(workdir, killed)
  for step in ("4", "6"):  # Killed after step 2's save: the later ones never happened.
    shutil.rmtree(os.path.join(killed, "checkpoints", step))
  resumed = run_stage(config, killed, mesh=make_mesh(data=2))
  assert int(resumed.state.step) == 6
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  rows = _rows(killed)
  assert rows == _rows(workdir), "the resumed run's losses or metrics differ"
  assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4, 6]
  assert all("accuracy" in r for r in rows)


def test_classify_and_eval_fall_back_from_a_latest_step_cut_short(classify_run, tmp_path, capfd):
  _, workdir, _ = classify_run
  run = str(shutil.copytree(workdir, tmp_path / "run"))
  texts = ["I need a plane seat in Oslo for 3 people."]
  from_4 = classify.classify_texts(run, texts, step="4", mesh=make_mesh())
  damage(os.path.join(run, "checkpoints", "6"), "truncated_arrays")
  capfd.readouterr()
  assert classify.classify_texts(run, texts, mesh=make_mesh()) == from_4
  assert "checkpoint 6" in capfd.readouterr().err
  assert evaluate_lib.eval_workdir(run, mesh=make_mesh())["step"] == 4
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="Checkpoint 6"):
    classify.classify_texts(run, texts, step="6", mesh=make_mesh())


def test_early_stop_metric_must_be_one_the_stage_reports():
  c = tiny_config()
  c.train.early_stop_metric = "accuracy"  # A pretraining stage has no accuracy.
  with pytest.raises(UserError, match=r"train.early_stop_metric='accuracy'.*'loss', 'perplexity'"):
    config_lib.stage_config(c)
  c.data.kind = "classify"
  c.classify.labels = "a,b"
  assert config_lib.stage_config(c).train.early_stop_metric == "accuracy"
  assert config_lib.metric_sign("accuracy") == -1.0  # Higher is better.
  c.train.early_stop_metric = "assistant_loss"
  with pytest.raises(UserError, match="train.early_stop_metric"):
    config_lib.stage_config(c)


def test_early_stopping_on_accuracy_stops_and_keeps_the_most_accurate(tmp_path,
                                                                       tiny_tokenizer_file,
                                                                       monkeypatch):
  # The loss keeps falling while accuracy peaks at step 2: early stopping on the loss would
  # run on and pick step 6 as the best.
  evals = iter([(1.0, 0.5), (0.9, 0.8), (0.8, 0.7), (0.7, 0.6), (0.6, 0.6), (0.5, 0.6)])

  def fake_evaluate(*args):
    loss, accuracy = next(evals)
    return {"loss": loss, "perplexity": 1.0, "accuracy": accuracy, "macro_f1": accuracy}

  monkeypatch.setattr(train_lib.evaluate_lib, "evaluate", fake_evaluate)
  config = _classify_config(tmp_path)
  config.train.update(eval_every=1, checkpoint_every=100, patience=2, max_to_keep=1,
                      early_stop_metric="accuracy")
  workdir = str(with_tokenizer(tmp_path / "run", tiny_tokenizer_file))
  result = run_stage(config, workdir, mesh=make_mesh(data=2))
  assert result.stopped_early and int(result.state.step) == 4
  assert result.best_step == 2
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True)
  try:
    assert checkpoints.all_steps() == [2, 4]  # Latest (max_to_keep=1) and the most accurate.
    assert checkpoints.resolve("best") == 2
  finally:
    checkpoints.close()
  again = run_stage(config, workdir, mesh=make_mesh(data=2))
  assert again.stopped_early and int(again.state.step) == 4, "a rerun stays stopped"


def test_the_report_judges_early_stopping_by_the_same_metric():
  from gptjax import report

  rows = [{"step": s, "split": "eval", "loss": loss, "accuracy": accuracy}
          for s, loss, accuracy in [(1, 1.0, 0.8), (2, 0.9, 0.7), (3, 0.8, 0.6)]]
  config = {"train.steps": 10, "train.patience": 2, "train.early_stop_metric": "accuracy"}
  assert "stopped early at step 3 of 10 (2 evals without a new best)" in report._stage_status(
      "classify", config, rows, None)
  config["train.early_stop_metric"] = "loss"
  assert "not finished" in report._stage_status("classify", config, rows, None)


def test_best_checkpoint_of_a_run_saved_before_early_stop_metric_is_its_lowest_eval_loss(
    tmp_path):
  import orbax.checkpoint as ocp

  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"), max_to_keep=1)
  try:
    for step, metrics in [(1, {"eval_loss": 2.0}), (2, {"eval_loss": 1.0}),
                          (3, {"eval_loss": 1.5}), (4, None)]:
      # How runs saved their metrics before `objective`.
      state = ocp.args.PyTreeSave({"x": np.full(2, step, np.float32)})
      checkpoints.manager.save(step, args=ocp.args.Composite(state=state), metrics=metrics)
    checkpoints.wait()
    assert checkpoints.resolve("best") == 2
    checkpoints.save(5, {"x": np.zeros(2, np.float32)}, objective=0.5)
    checkpoints.wait()
    assert checkpoints.resolve("best") == 5
  finally:
    checkpoints.close()
