"""The run loader and its figures: workdirs written here by hand, and real tiny runs."""

import json
import os
import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import metrics
from gptjax import runs

plt.switch_backend("Agg")  # Headless: figures render to memory only.


def _fake_run(path, *, stage="pretrain", steps=(1, 2), start=1000.0, batch_size=8,
              seq_len=32, history_weight=1.0, init_from="", data_dir="/data"):
  """A workdir as `gptjax train` leaves it: config.json, and train rows with an eval at the end."""
  config = config_lib.base_config()
  config.stage, config.init_from = stage, init_from
  config.train.batch_size, config.data.seq_len = batch_size, seq_len
  config.data.data_dir, config.dialogue.history_weight = data_dir, history_weight
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))
  extra = {"assistant_loss": 3.0} if stage == "dialogue" else {}
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in steps:
      f.write(json.dumps({"step": step, "stage": stage, "split": "train", "time": start + step,
                          "loss": 4.0 / step, "lr": 1e-3, "grad_norm": 1.0,
                          "tokens_per_sec": 100.0, **extra}) + "\n")
    f.write(json.dumps({"step": steps[-1], "stage": stage, "split": "eval",
                        "time": start + steps[-1] + 0.5, "loss": 2.0, "perplexity": np.exp(2.0),
                        "tokens": 64.0, **extra}) + "\n")
  return str(path)


def _fake_pipeline(path, finished=("pretrain", "dialogue")):
  """A pipeline workdir: a 3-step pretraining stage, then a 2-step dialogue stage."""
  _fake_run(os.path.join(path, "pretrain"), steps=(1, 2, 3), start=100.0)
  _fake_run(os.path.join(path, "dialogue"), stage="dialogue", steps=(1, 2), start=200.0,
            batch_size=4, init_from=os.path.join(path, "pretrain"))
  if finished:
    with open(os.path.join(path, "pipeline.json"), "w") as f:
      json.dump({"finished": list(finished)}, f)
  return str(path)


# pipeline.json lists finished stages only, so a pipeline still in its last stage (or in a
# rerun) must be ordered too: by time, never by folder name ("dialogue" < "pretrain").
@pytest.mark.parametrize("finished", [("pretrain", "dialogue"), ("pretrain",), ()])
def test_a_pipeline_counts_tokens_across_its_stages(tmp_path, finished):
  df = runs.load([_fake_pipeline(tmp_path / "demo", finished)])
  assert list(df.columns[:len(runs.BASE_COLUMNS)]) == runs.BASE_COLUMNS
  train = df[df["split"] == "train"]
  assert list(zip(train["stage"], train["step"], train["stage_tokens"], train["tokens"])) == [
      ("pretrain", 1, 256, 256), ("pretrain", 2, 512, 512), ("pretrain", 3, 768, 768),
      ("dialogue", 1, 128, 896), ("dialogue", 2, 256, 1024)], (
      "dialogue tokens continue from the 3 pretraining steps of 8 x 32 tokens, 4 x 32 a step")
  evals = df[df["split"] == "eval"]
  assert list(evals["tokens"]) == [768, 1024] and list(evals["eval_tokens"]) == [64.0, 64.0]
  assert set(df["run"]) == {"demo"} and df["elapsed_s"].min() == 0.0
  assert df["elapsed_s"].max() == pytest.approx(101.5)
  assert df["assistant_loss"].notna().tolist() == (df["stage"] == "dialogue").tolist()


def test_a_half_written_last_line_is_left_out(tmp_path):
  run = _fake_run(tmp_path / "run", steps=(1, 2))
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write('{"step": 3, "stage": "pretrain", "split": "tr')  # A writer caught mid-line.
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # A run being written is not a problem worth a warning.
    df = runs.load(run)
  assert list(zip(df["step"], df["split"])) == [(1, "train"), (2, "train"), (2, "eval")]
  assert df.attrs["unreadable"] == {}


def test_a_missing_workdir_is_named_and_the_other_runs_still_load(tmp_path):
  run, missing = _fake_run(tmp_path / "run"), str(tmp_path / "typo")
  with pytest.warns(UserWarning, match=f"Skipping run {re.escape(missing)}: no such directory"):
    df = runs.load([run, missing])
  assert set(df["run"]) == {"run"}
  assert df.attrs["unreadable"] == {missing: "no such directory"}


def test_no_readable_run_is_one_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  _fake_run(tmp_path / "fresh")
  open(tmp_path / "fresh" / "metrics.jsonl", "w").close()  # Started, nothing logged yet.
  with pytest.warns(UserWarning), pytest.raises(ValueError, match=(
      r"None of the runs could be read: .*typo: no such directory; .*empty: not a gptjax "
      r"workdir .*; .*fresh: no metrics rows yet; pass workdirs of `gptjax train`")):
    runs.load([str(tmp_path / "typo"), str(tmp_path / "empty"), str(tmp_path / "fresh")])


def test_config_columns_are_the_values_that_differ_between_runs(tmp_path):
  paths = [_fake_run(tmp_path / "full", stage="dialogue", init_from="/runs/p"),
           _fake_run(tmp_path / "replies", stage="dialogue", init_from="/runs/p",
                     history_weight=0.0, data_dir="/elsewhere"),
           _fake_run(tmp_path / "scratch", stage="dialogue")]
  df = runs.load(paths)
  assert df.attrs["config_columns"] == ["dialogue.history_weight", "pretrained"], (
      "data_dir is where the data lives, not a difference; init_from becomes `pretrained`")
  assert df.groupby("run", sort=False)[df.attrs["config_columns"]].first().to_dict("index") == {
      "full": {"dialogue.history_weight": 1.0, "pretrained": True},
      "replies": {"dialogue.history_weight": 0.0, "pretrained": True},
      "scratch": {"dialogue.history_weight": 1.0, "pretrained": False}}
  assert runs.load(paths[0]).attrs["config_columns"] == [], "one run differs from nothing"


def test_configs_are_compared_stage_by_stage(tmp_path):
  # A pretraining stage compared with a dialogue stage would differ everywhere.
  pipeline = _fake_pipeline(tmp_path / "demo")
  replies = _fake_run(tmp_path / "replies", stage="dialogue", history_weight=0.0,
                      batch_size=4, init_from="/runs/p")
  df = runs.load([pipeline, replies])
  assert df.attrs["config_columns"] == ["dialogue.history_weight"]
  assert df.groupby(["run", "stage"], sort=False)["dialogue.history_weight"].first().tolist() == [
      1.0, 1.0, 0.0]


def test_runs_are_named_by_the_shortest_path_ends_that_tell_them_apart(tmp_path):
  paths = [_fake_run(tmp_path / "a" / "x"), _fake_run(tmp_path / "b" / "x"),
           _fake_run(tmp_path / "b" / "z")]
  assert list(runs.load(paths)["run"].unique()) == ["a/x", "b/x", "b/z"]


def test_paths_come_from_the_environment_when_set(monkeypatch):
  monkeypatch.delenv("GPTJAX_RUNS", raising=False)
  assert runs.paths_from_env(["runs/a"]) == ["runs/a"]
  monkeypatch.setenv("GPTJAX_RUNS", os.pathsep.join(["/x/a", "/x/b", ""]))
  assert runs.paths_from_env(["runs/a"]) == ["/x/a", "/x/b"]


def test_summary_holds_the_last_values_of_every_stage(tmp_path):
  df = runs.load([_fake_pipeline(tmp_path / "demo"),
                  _fake_run(tmp_path / "replies", stage="dialogue", history_weight=0.0,
                            batch_size=4, init_from="/runs/p")])
  table = runs.summary(df)
  assert table.index.tolist() == [("demo", "pretrain"), ("demo", "dialogue"),
                                  ("replies", "dialogue")]
  assert table["tokens"].tolist() == [768, 1024, 256]
  assert table["train_loss"].tolist() == pytest.approx([4 / 3, 2.0, 2.0])
  assert table["eval_assistant_loss"].isna().tolist() == [True, False, False]
  assert table["dialogue.history_weight"].tolist() == [1.0, 1.0, 0.0]


def test_figures_mark_the_stage_boundary_and_label_runs_by_their_config(tmp_path):
  df = runs.load([_fake_pipeline(tmp_path / "demo"),
                  _fake_run(tmp_path / "replies", stage="dialogue", history_weight=0.0,
                            batch_size=4, init_from="/runs/p")])
  stages = runs.plot_stages(df)
  boundaries = [line.get_xdata()[0] for line in stages.axes[0].get_lines()
                if line.get_linestyle() == ":"]
  assert boundaries == [768], "the dialogue stage starts after 3 steps of 8 x 32 tokens"
  comparison = runs.plot_comparison(df)
  assert comparison.axes[1].get_title() == "dialogue eval assistant_loss"
  assert [t.get_text() for t in comparison.axes[0].get_legend().get_texts()] == [
      "demo (dialogue.history_weight=1.0)", "replies (dialogue.history_weight=0.0)"]
  assert runs.plot_comparison(df, stage="pretrain").axes[0].get_title() == "pretrain train loss"
  with pytest.raises(ValueError, match=r"No run has a stage 'sft'; the stages loaded are"):
    runs.plot_comparison(df, stage="sft")
  optimizer = runs.plot_optimizer(df)
  assert [len(ax.get_lines()) for ax in optimizer.axes] == [3, 3, 2]  # With one boundary each.
  runs.save(optimizer, str(tmp_path / "figures"), "optimizer")
  assert (tmp_path / "figures" / "optimizer.png").stat().st_size > 0
  plt.close("all")


def test_each_comparison_arm_changes_one_thing_from_the_baseline():
  import runpy
  experiments = os.path.join(os.path.dirname(__file__), "..", "experiments")

  def arm(name, *args):
    return runpy.run_path(os.path.join(experiments, name + ".py"))["get_config"](*args)

  baseline = arm("compare_history_weight")
  assert arm("compare_pretraining").to_dict() == baseline.to_dict(), "one baseline serves both"
  # The scratch arm is the baseline's dialogue stage; only the pipeline sets its init_from.
  assert arm("compare_pretraining", "scratch").to_dict() == baseline.dialogue.to_dict()
  replies = arm("compare_history_weight", "replies_only")
  assert replies.dialogue.history_weight == 0.0
  replies.dialogue.history_weight = baseline.dialogue.dialogue.history_weight
  assert replies.to_dict() == baseline.dialogue.to_dict()


@pytest.mark.slow
def test_real_runs_load_with_both_stages_and_their_difference(trained_runs):
  df = runs.load([trained_runs["pipeline"], trained_runs["replies_only"]])
  assert df.attrs["config_columns"] == ["dialogue.history_weight"]
  assert df.groupby("run", sort=False)["stage"].unique().map(list).to_dict() == {
      "demo": ["pretrain", "dialogue"], "replies_only": ["dialogue"]}
  dialogue = df[(df["run"] == "demo") & (df["stage"] == "dialogue")]
  assert (dialogue["tokens"] - dialogue["stage_tokens"] == 4 * 8 * 32).all()
  assert df.loc[df["stage"] == "dialogue", "assistant_loss"].notna().all()
  replies = df[df["run"] == "replies_only"]
  assert replies["step"].tolist() == [1, 2, 2, 3, 4, 4]


@pytest.mark.slow
def test_tensorboard_events_hold_the_losses_of_metrics_jsonl(trained_runs):
  from tensorboard.backend.event_processing import event_accumulator

  stage_dirs = [os.path.join(trained_runs["pipeline"], "pretrain"),
                os.path.join(trained_runs["pipeline"], "dialogue"), trained_runs["replies_only"]]
  for stage_dir in stage_dirs:
    events = event_accumulator.EventAccumulator(os.path.join(stage_dir, "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    rows = metrics.read_rows(os.path.join(stage_dir, "metrics.jsonl"))
    for split in ("train", "eval"):
      for key in ("loss", "assistant_loss"):
        # TensorBoard keeps float32 values.
        expected = [(r["step"], float(np.float32(r[key]))) for r in rows
                    if r["split"] == split and key in r]
        if not expected:
          assert f"{split}/{key}" not in tags
          continue
        got = [(e.step, e.value) for e in events.Scalars(f"{split}/{key}")]
        assert got == expected, f"{stage_dir}: {split}/{key}"
