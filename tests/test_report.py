"""The report card: renders for finished, running and failed runs, from the files alone."""

import json
import os

import matplotlib.pyplot as plt
import pytest
from conftest import gptjax
from test_runs import _fake_pipeline, _fake_run

from gptjax import generate as generate_lib
from gptjax import reply_eval, report

plt.switch_backend("Agg")


def _read(path):
  with open(path) as f:
    return f.read()


def test_a_pipeline_in_its_last_stage_is_reported_as_running(tmp_path):
  path = _fake_pipeline(tmp_path / "demo", finished=("pretrain",))
  text = _read(report.write(path))
  assert "| pretrain | finished (3 steps) |" in text
  assert "| dialogue | not finished: step 2 of" in text
  assert "started from random parameters" in text and "started from `" in text
  assert "| `train.batch_size` | 4 | 16 |" in text, "the dialogue stage's batch differs"
  assert "![losses](report_files/losses.png)" in text
  assert os.path.exists(tmp_path / "demo" / "report_files" / "losses.png")
  assert "No `eval --generate` results yet" in text and "## Host" in text


def test_failed_and_unreadable_stages_do_not_stop_the_report(tmp_path):
  path = _fake_pipeline(tmp_path / "demo", finished=("pretrain",))
  open(os.path.join(path, "dialogue", "metrics.jsonl"), "w").close()  # Died before a row.
  broken = os.path.join(path, "zz_broken")
  os.makedirs(broken)
  with open(os.path.join(broken, "config.json"), "w") as f:
    f.write("{not json")
  text = _read(report.write(path))
  assert "| dialogue | no metrics yet (starting, or failed before its first log) |" in text
  assert "zz_broken`: unreadable" in text
  assert "*Not available:" in text, "the figures cannot load the broken stage: said so"
  assert "## Host" in text


def test_a_single_run_stopped_early_says_so(tmp_path):
  path = _fake_run(tmp_path / "run", steps=(1, 2))
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["train"].update(steps=10, patience=1)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 3, "stage": "pretrain", "split": "eval", "time": 1004.0,
                        "loss": 2.5, "perplexity": 12.0, "tokens": 64.0}) + "\n")
  text = _read(report.write(path))
  assert "stopped early at step 3 of 10 (1 evals without a new best)" in text
  assert "| 2 (step 2) |" in text, "the best eval loss and its step"


@pytest.mark.slow
def test_the_report_of_real_runs_has_every_section(trained_runs):
  workdir = trained_runs["pipeline"]
  reply_eval.evaluate_replies(os.path.join(workdir, "dialogue"), num_conversations=2,
                              sampling=generate_lib.Sampling(max_new_tokens=6,
                                                             temperature=0.0))
  out = gptjax("report", "--workdir", workdir, check=True)
  text = _read(os.path.join(workdir, report.REPORT_FILE))
  assert "report.md" in out.stdout and "*Not available" not in text, text
  assert text.count("| finished (4 steps) |") == 2
  assert "tokenizer sha256 `" in text and "started from `" in text
  assert "characters per token" in text
  assert "| dialogue | 4 | " in text and "### dialogue: held-out turns" in text
  assert "| reference | model |" in text
  assert "dialogue, eval at step 4" in text, "the loss by dialogue structure of the eval rows"
  for name in ("losses", "optimizer"):
    assert os.path.exists(os.path.join(workdir, report.FIGURES, f"{name}.png"))


def test_the_loss_by_dialogue_structure_is_tabled_and_drawn(tmp_path):
  path = _fake_pipeline(tmp_path / "demo")
  row = {"step": 2, "stage": "dialogue", "split": "eval", "time": 203.0, "loss": 1.5,
         "loss_role_user": 3.0, "tokens_role_user": 40.0, "loss_role_assistant": 2.0,
         "tokens_role_assistant": 30.0, "loss_turn_1": 2.5, "tokens_turn_1": 20.0,
         "loss_turn_2": 1.0, "tokens_turn_2": 10.0}
  with open(os.path.join(path, "dialogue", "metrics.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
  text = _read(report.write(path))
  section = text[text.index("## Loss by dialogue structure"):text.index("## Reply quality")]
  assert "dialogue, eval at step 2" in section and "pretrain" not in section
  assert "|  | role user | role assistant | turn 1 | turn 2 |" in section
  assert "| loss | 3 | 2 | 2.5 | 1 |" in section and "| tokens | 40 | 30 | 20 | 10 |" in section
  assert os.path.exists(tmp_path / "demo" / "report_files" / "structure.png")


def test_a_comparison_averages_each_arm_over_its_seeds(tmp_path):
  paths = []
  for weight in (1.0, 0.0):
    for seed in (0, 1, 2):
      path = _fake_run(tmp_path / f"w{weight}_s{seed}", stage="dialogue",
                       history_weight=weight)
      with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
      config["train"]["seed"] = seed
      with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
      with open(os.path.join(path, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 2, "stage": "dialogue", "split": "eval", "time": 1003.0,
                            "loss": 2.0, "assistant_loss": 2.0 + weight + seed / 10}) + "\n")
      with open(os.path.join(path, reply_eval.SUMMARY_FILE), "w") as f:
        json.dump({"bleu": 10.0 * (seed + 1), "chrf": 20.0}, f)
      paths.append(path)
  runs_table, arms = report.comparison(paths)
  assert len(runs_table) == 6 and list(arms.index.names) == ["dialogue.history_weight"]
  assert arms.loc[1.0, ("eval_assistant_loss", "mean")] == pytest.approx(3.1)
  assert arms.loc[0.0, ("bleu", "mean")] == pytest.approx(20.0)
  assert arms.loc[0.0, ("bleu", "count")] == 3
  text = _read(report.write_comparison(str(tmp_path / "out"), paths))
  assert "| 1.0 | 3.1 ± 0.1 (3) |" in text and "| 0.0 | 2.1 ± 0.1 (3) |" in text
  assert os.path.exists(tmp_path / "out" / "report_files" / "comparison.png")
