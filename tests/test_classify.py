"""Sequence classification (data.kind="classify", gptjax/classify.py)."""

import json
import random

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gptjax, make_mesh, run_stage, tiny_config

from gptjax import classify, runs
from gptjax import config as config_lib
from gptjax import evaluate as evaluate_lib
from gptjax import metrics as metrics_lib
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
