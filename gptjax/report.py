"""The report card of a run: DIR/report.md and its figures in DIR/report_files/.

One page that says what was trained, how, and with what result, for a `gptjax train` or
`gptjax pipeline` workdir: the stages (status, steps, tokens, wall time, losses, early
stopping, the config keys that differ from the base config, and lineage: the workdir and
step a stage started from, the tokenizer's hash), the tokenizer (vocabulary, characters per
token on each stage's eval text), loss figures, the dialogue metrics that `eval` wrote
(loss by dialogue structure, reply quality from `eval --generate`), a few held-out
conversations with reference and model replies side by side, and the host.

Everything comes from the files a run leaves, read through gptjax/runs.py as the notebook
reads them. A run still in progress, or a stage that failed, is reported as such: a section
that cannot be rendered says why in its place and the rest of the report still renders.
"""

import datetime
import hashlib
import json
import os
import platform
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gptjax import config as config_lib
from gptjax import datasets, dialogue, reply_eval, runs
from gptjax import metrics as metrics_lib
from gptjax import workdir as workdir_lib

REPORT_FILE, COMPARISON_FILE, FIGURES = "report.md", "comparison.md", "report_files"
# Reply-quality scores the comparison averages over seeds (gptjax/reply_metrics.py).
COMPARED_SCORES = ("bleu", "chrf", "rouge_l", "distinct_2", "length_ratio", "ended_rate",
                   "degenerate_rate")
CHARS_PER_TOKEN_TEXTS = 200  # Eval texts a stage's characters-per-token figure reads.
EXAMPLES = 4  # Held-out turns shown side by side.


def _cell(value) -> str:
  """A Markdown table cell: numbers rounded, pipes and newlines escaped."""
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "–"
  if isinstance(value, (float, np.floating)):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def _guarded(render: Callable[[], list[str]], title: str = "") -> list[str]:
  """`render`'s lines under `title`, or one line there saying why they could not be."""
  head = [f"## {title}", ""] if title else []
  try:
    return head + render()
  # A report describes broken runs too: whatever breaks a section is shown in its place.
  except Exception as e:  # pylint: disable=broad-except  # noqa: BLE001
    return head + [f"*Not available: {type(e).__name__}: {e}*", ""]


def _file_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


def _finished(workdir: str) -> list[str] | None:
  """The stages pipeline.json lists as finished, or None for a single-stage run."""
  path = os.path.join(workdir, "pipeline.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["finished"]


def _stage_status(name: str, config: dict, rows: list[dict], finished: list[str] | None) -> str:
  """finished / stopped early / in progress or stopped, from the files alone."""
  steps = config["train.steps"]
  train = [r for r in rows if r["split"] == "train"]
  if not rows:
    return "no metrics yet (starting, or failed before its first log)"
  last = max(r["step"] for r in rows)
  metric = config.get("train.early_stop_metric", "loss")  # Followed by patience, like train.
  evals = [config_lib.metric_sign(metric) * r[metric] for r in rows
           if r["split"] == "eval" and metric in r]
  patience = config.get("train.patience", 0)
  since_best = len(evals) - 1 - int(np.argmin(evals)) if evals else 0
  early = patience > 0 and since_best >= patience and last < steps
  done = (name in finished) if finished is not None else (last >= steps or early)
  if done and early:
    return f"stopped early at step {last} of {steps} ({since_best} evals without a new best)"
  if done:
    return f"finished ({last} steps)"
  where = f"step {last} of {steps}" if train else "no train row yet"
  return f"not finished: {where} (still running, or stopped: rerun to resume)"


class _Stage:
  """What the report reads of one stage workdir."""

  def __init__(self, path: str, finished: list[str] | None, single: bool):
    self.path = path
    with open(workdir_lib.config_path(path)) as f:
      self.flat = runs.flatten(json.load(f))
    # Named as runs.load names stages: a pipeline's by folder, a single run's by its config.
    self.name = self.flat["stage"] if single else os.path.basename(path)
    self.rows = metrics_lib.read_rows(os.path.join(path, "metrics.jsonl"))
    self.status = _stage_status(self.name, self.flat, self.rows, finished)

  def split(self, split: str) -> list[dict]:
    return [r for r in self.rows if r["split"] == split]

  def summary_row(self) -> list:
    train, evals = self.split("train"), self.split("eval")
    last = max((r["step"] for r in self.rows), default=0)
    times = [r["time"] for r in self.rows]
    best = min(evals, key=lambda r: r["loss"]) if evals else {}
    rates = [r["tokens_per_sec"] for r in train if "tokens_per_sec" in r]
    return [self.name, self.status, last,
            f"{last * self.flat['train.batch_size'] * self.flat['data.seq_len']:,}",
            f"{max(times) - min(times):.0f} s" if times else None,
            float(np.median(rates)) if rates else None,
            train[-1]["loss"] if train else None, evals[-1]["loss"] if evals else None,
            f"{best['loss']:.4g} (step {best['step']})" if best else None,
            evals[-1].get("assistant_loss") if evals else None]

  def lineage(self) -> str:
    source = self.flat.get("init_from")
    start = (f"started from `{source}` at step {self.flat.get('init_from_step')}" if source
             else "started from random parameters")
    tokenizer = workdir_lib.tokenizer_path(self.path)
    token = (f"tokenizer sha256 `{_file_hash(tokenizer)}`" if os.path.exists(tokenizer)
             else "no tokenizer.model")
    return f"- **{self.name}** (`{self.path}`): {start}; {token}."

  def config_diff(self) -> list[list]:
    base = runs.flatten(json.loads(config_lib.to_json(config_lib.stage_config(
        config_lib.base_config()))))
    keys = sorted(k for k in set(base) | set(self.flat)
                  if k not in ("init_from", "init_from_step") and self.flat.get(k) != base.get(k))
    return [[f"`{k}`", self.flat.get(k), base.get(k)] for k in keys]


def _stages_section(stages: list[_Stage]) -> list[str]:
  lines = []
  lines += _table(["stage", "status", "steps", "tokens seen", "wall time", "tokens/s",
                   "final train loss", "final eval loss", "best eval loss",
                   "eval assistant_loss"], [s.summary_row() for s in stages])
  lines += [("Wall time runs from a stage's first to its last metrics row (compilation before "
            "the first row is not counted); tokens/s is the median over train rows."), ""]
  lines += ["### Lineage", ""] + [s.lineage() for s in stages] + [""]
  for s in stages:
    lines += [f"### {s.name}: config keys that differ from the base config", ""]
    lines += _table(["key", "value", "base"], s.config_diff())
  return lines


def _chars_per_token(stage: _Stage) -> float:
  """Characters per token of the first eval texts of `stage` (conversations as transcripts)."""
  config = workdir_lib.read_config(stage.path)
  tokenizer = workdir_lib.load_tokenizer(stage.path)
  d = config.data
  if not datasets.has_eval(d):
    raise ValueError("no eval set configured")
  if d.kind == "dialogue":
    texts = [dialogue.as_text(c) for c in datasets.conversations(d, "eval")[0]]
  else:
    texts = datasets.text_documents(d, "eval")
  texts = texts[:CHARS_PER_TOKEN_TEXTS]
  return sum(map(len, texts)) / max(1, sum(len(tokenizer.encode(t)) for t in texts))


def _tokenizer_section(workdir: str, stages: list[_Stage]) -> list[str]:
  lines = []
  path = workdir_lib.tokenizer_path(workdir)
  if not os.path.exists(path):
    path = workdir_lib.tokenizer_path(stages[0].path)
  tokenizer = workdir_lib.load_tokenizer(os.path.dirname(path))
  lines += [(f"`{path}`: {tokenizer.vocab_size} tokens (ids 0-7 reserved for pad, unk, bos, "
            f"eos and the chat tokens), sha256 `{_file_hash(path)}`."), ""]
  rows = []
  for s in stages:
    value = _guarded(lambda s=s: [f"{_chars_per_token(s):.3f}"])[0]
    rows.append([s.name, s.flat.get("data.kind"), s.flat.get("data.eval_files")
                 or s.flat.get("data.dataset"), value])
  lines += _table(["stage", "data", "eval text", "characters per token"], rows)
  return lines


def _figures_section(workdir: str, df: pd.DataFrame) -> list[str]:
  folder = os.path.join(workdir, FIGURES)
  lines = []
  for name, plot in (("losses", runs.plot_stages), ("optimizer", runs.plot_optimizer)):
    fig = plot(df)
    runs.save(fig, folder, name)
    plt.close(fig)
    lines += [f"![{name}]({FIGURES}/{name}.png)", ""]
  return lines


def _structure_section(workdir: str, df: pd.DataFrame) -> list[str]:
  table = runs.structure(df)
  if table.empty:
    return ["No evaluation with loss by dialogue structure in this run.", ""]
  lines = []
  for (_, stage), row in table.iterrows():
    lines += [(f"{stage}, eval at step {int(row['step'])}: loss (nats a token) and target "
              "tokens by role and by the reply's index in its conversation."), ""]
    names = [c for c in table.columns if c.startswith("loss_") and np.isfinite(row[c])]
    lines += _table(["", *[c[len("loss_"):].replace("_", " ") for c in names]],
                    [["loss", *[row[c] for c in names]],
                     ["tokens", *[int(row[c.replace("loss_", "tokens_", 1)]) for c in names]]])
  fig = runs.plot_structure(df)
  runs.save(fig, os.path.join(workdir, FIGURES), "structure")
  plt.close(fig)
  return lines + [f"![structure]({FIGURES}/structure.png)", ""]


def _reply_quality_section(stages: list[_Stage]) -> list[str]:
  lines = []
  rows, examples = [], []
  for s in stages:
    path = os.path.join(s.path, reply_eval.SUMMARY_FILE)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      summary = json.load(f)
    rows.append([s.name, summary["step"], summary["split"], summary["turns"], summary["bleu"],
                 summary["chrf"], summary["rouge_l"], summary["distinct_1"],
                 summary["distinct_2"], summary["length_ratio"], summary["ended_rate"],
                 summary["degenerate_rate"], json.dumps(summary["sampling"])])
    examples.append((s, summary["file"]))
  if not rows:
    return lines + [("No `eval --generate` results yet: run `python -m gptjax eval --workdir "
                    "STAGE_DIR --generate`, then `report` again."), ""]
  lines += _table(["stage", "step", "split", "turns", "BLEU", "chrF", "ROUGE-L", "distinct-1",
                   "distinct-2", "length ratio", "ended", "degenerate", "sampling"], rows)
  lines += [("BLEU, chrF and ROUGE-L are 0-100 against the reference reply; `ended` is the share "
            "of replies that stopped at the end token, `degenerate` the share that are empty or "
            "repeat a word 3-gram 3 times (gptjax/reply_metrics.py)."), ""]
  for s, path in examples:
    lines += _guarded(lambda s=s, path=path: _examples(s.name, path))
  return lines


def _examples(stage: str, path: str) -> list[str]:
  with open(path) as f:
    records = [json.loads(line) for _, line in zip(range(EXAMPLES), f)]
  lines = [f"### {stage}: held-out turns", ""]
  for r in records:
    lines += [f"Conversation {r['conversation']}, reply {r['reply_index']}:", ""]
    lines += [f"> **{m['role']}**: {_cell(m['content'])}  " for m in r["history"][-4:]]
    lines += [""] + _table(["reference", "model"], [[r["reference"], r["reply"]]])
  return lines


def _host_section() -> list[str]:
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return ["The machine that wrote this report:", "",
          (f"- jax {jax.__version__}, Python {platform.python_version()}, {platform.system()} "
          f"{platform.machine()}"),
          (f"- {len(devices)} {devices[0].platform} device(s): {', '.join(kinds)}; "
          f"{jax.process_count()} process(es)"), ""]


def write(workdir: str) -> str:
  """Writes DIR/report.md (and DIR/report_files/*.png); returns its path."""
  workdir = os.path.abspath(workdir)
  finished = _finished(workdir)
  stage_paths = runs.stage_dirs(workdir)
  stages, broken = [], []
  for path in stage_paths:
    try:
      stages.append(_Stage(path, finished, single=path == workdir))
    except (OSError, ValueError, KeyError) as e:
      broken.append(f"- `{path}`: unreadable ({type(e).__name__}: {e})")
  lines = [f"# Report card: `{workdir}`", "",
           (f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `python -m "
           f"gptjax report`. Stages: {', '.join(s.name for s in stages) or 'none readable'}."),
           ""]
  if broken:
    lines += ["Stages that could not be read:", ""] + broken + [""]
  if stages:
    lines += _guarded(lambda: _stages_section(stages), "Stages")
    lines += _guarded(lambda: _tokenizer_section(workdir, stages), "Tokenizer")
  lines += _guarded(lambda: _figures_section(workdir, runs.load([workdir])), "Losses")
  lines += _guarded(lambda: _structure_section(workdir, runs.load([workdir])),
                    "Loss by dialogue structure")
  lines += _guarded(lambda: _reply_quality_section(stages),
                    "Reply quality on held-out conversations")
  lines += _guarded(_host_section, "Host")
  path = os.path.join(workdir, REPORT_FILE)
  workdir_lib.atomic_write(path, "\n".join(lines))
  return path


def _reply_summary(path: str) -> dict:
  """The `eval --generate` summary of a run's last dialogue stage that has one, else {}."""
  found = {}
  for stage_dir in runs.stage_dirs(path):
    summary = os.path.join(stage_dir, reply_eval.SUMMARY_FILE)
    if os.path.exists(summary):
      with open(summary) as f:
        found = json.load(f)
  return found


def comparison(paths: list[str], stage: str = "dialogue") -> tuple[pd.DataFrame, pd.DataFrame]:
  """(one row a run, one row an arm) for `stage` of runs that differ in their config and seed.

  An arm is a set of runs whose config differs only in seeds (keys ending in `seed`); the
  arm table gives the mean, standard deviation and count over its runs of the held-out
  `eval_assistant_loss` (the last evaluation) and of the reply-quality scores.
  """
  df = runs.load(paths)
  table = runs.summary(df).reset_index()
  table = table[table["stage"] == stage].copy()
  if table.empty:
    raise ValueError(f"no run has a stage {stage!r}")
  readable = [p for p in paths if p not in df.attrs["unreadable"]]
  summaries = dict(zip(df["run"].unique(), map(_reply_summary, readable)))
  for score in COMPARED_SCORES:
    table[score] = [summaries.get(run, {}).get(score, np.nan) for run in table["run"]]
  arms = [c for c in df.attrs["config_columns"] if not c.endswith("seed") and c in table]
  values = ["eval_assistant_loss", *COMPARED_SCORES]
  if not arms:
    return table, pd.DataFrame()
  grouped = table.groupby(arms, dropna=False)[values].agg(["mean", "std", "count"])
  return table, grouped


def _spread(mean: float, std: float, count: float) -> str:
  count = int(count)
  if not count:
    return "–"
  return f"{mean:.4g} ± {std:.2g} ({count})" if count > 1 else f"{mean:.4g} (1)"


def write_comparison(workdir: str, paths: list[str], stage: str = "dialogue") -> str:
  """Writes DIR/comparison.md: the runs and their arms (see `comparison`), and a figure."""
  table, arms = comparison(paths, stage)
  folder = os.path.join(workdir, FIGURES)
  lines = [f"# Comparison of {len(table)} runs, stage {stage}", ""]
  columns = [c for c in table.columns if c not in ("stage", "tokens")]
  lines += ["## Runs", ""] + _table(columns, table[columns].values.tolist())
  if not arms.empty:
    lines += ["## Arms: mean ± standard deviation (runs) over seeds", ""]
    values = list(dict.fromkeys(v for v, _ in arms.columns))
    rows = [[str(key), *[_spread(row[(v, "mean")], row[(v, "std")], row[(v, "count")])
                         for v in values]] for key, row in arms.iterrows()]
    lines += _table([", ".join(map(str, arms.index.names)), *values], rows)
  fig = runs.plot_comparison(runs.load(paths), stage=stage)
  runs.save(fig, folder, "comparison")
  plt.close(fig)
  lines += [f"![comparison]({FIGURES}/comparison.png)", ""]
  path = os.path.join(workdir, COMPARISON_FILE)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.atomic_write(path, "\n".join(lines))
  return path
