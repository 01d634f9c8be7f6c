"""metrics.jsonl and TensorBoard event files."""

import json

from tensorboard.backend.event_processing import event_file_loader

from gptjax import metrics


def test_rows_go_to_jsonl_and_tensorboard_with_the_same_values(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), stage="pretrain")
  writer.write(10, "train", {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 99.0})
  writer.write(10, "eval", {"loss": 2.75})
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["stage"], r["split"], r["loss"]) for r in rows] == [
      (10, "pretrain", "train", 2.5), (10, "pretrain", "eval", 2.75)]
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  scalars = {}
  for event in event_file_loader.LegacyEventFileLoader(str(event_file)).Load():
    for value in event.summary.value:
      scalars[(event.step, value.tag)] = value.simple_value
  assert scalars[(10, "train/loss")] == 2.5 and scalars[(10, "eval/loss")] == 2.75


def test_resume_truncates_rows_after_the_checkpoint_and_skips_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n"
                          for s in (1, 2, 3, 4)) + '{"step": 5, "spl')
  writer = metrics.MetricsWriter(str(tmp_path), stage="pretrain")
  writer.truncate_after(2)
  writer.write(3, "train", {"loss": 0.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics.read_rows(str(path))] == [
      (1, 1.0), (2, 1.0), (3, 0.5)]
