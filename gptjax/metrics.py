"""Where metrics go: `DIR/metrics.jsonl`, TensorBoard event files and the console.

metrics.jsonl has one JSON object a line with at least `step`, `stage`, `split` ("train" or
"eval") and `loss`; it is the file notebooks read. Only the primary process writes.
"""

import json
import os
import socket
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


def read_rows(path: str) -> list[dict]:
  """The complete rows of a metrics.jsonl; a torn line (a run killed mid-write) is skipped."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows


def _open_event_file(logdir: str) -> RecordWriter:
  """A new TensorBoard event file (TFRecord framing), written without TensorFlow.

  tensorboard's own EventFileWriter goes through tf.io.gfile whenever TensorFlow is
  installed, which would import all of TensorFlow into every training run.
  """
  os.makedirs(logdir, exist_ok=True)
  name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
  writer = RecordWriter(open(os.path.join(logdir, name), "wb"))
  header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
  writer.write(header.SerializeToString())
  return writer


class MetricsWriter:
  """Appends metric rows to metrics.jsonl and TensorBoard (no-op when not primary)."""

  def __init__(self, workdir: str, *, stage: str, primary: bool = True):
    self.stage = stage
    self.primary = primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = self._events = None
    if primary:
      self._file = open(self.path, "a")
      self._events = _open_event_file(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int):
    """Drops rows past `step`: a resumed run rewrites what followed its checkpoint."""
    if not self.primary:
      return
    rows = [r for r in read_rows(self.path) if r["step"] <= step]
    self._file.close()
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")

  def write(self, step: int, split: str, metrics: dict):
    """One row: {step, stage, split, time, **metrics} with float values."""
    if not self.primary:
      return
    values = {k: float(v) for k, v in metrics.items()}
    row = {"step": int(step), "stage": self.stage, "split": split, "time": time.time(), **values}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v) for k, v in values.items()])
    event = event_pb2.Event(wall_time=row["time"], step=int(step), summary=summary)
    self._events.write(event.SerializeToString())
    self._events.flush()

  def close(self):
    if self.primary:
      self._file.close()
      self._events.close()
