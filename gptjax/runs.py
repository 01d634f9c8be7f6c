"""Training runs as one pandas DataFrame, and the loss figures the notebooks draw from it.

A run is a `gptjax train` workdir (config.json and metrics.jsonl) or a `gptjax pipeline`
workdir (one such workdir a stage, DIR/<stage>/). `load(paths)` gives one row a metrics row:

  run, stage, split, step   the run's name (the shortest unique end of its path) and the row
  tokens                    tokens seen; in a pipeline it continues across the stages
  stage_tokens              tokens seen within the stage: train.batch_size * data.seq_len a step
  time, elapsed_s           unix seconds; seconds since the run's first row
  loss, assistant_loss, perplexity, lr, grad_norm, tokens_per_sec, eval_tokens, ...
                            as in metrics.jsonl (its eval `tokens` is renamed `eval_tokens`)
  config columns            the dotted config keys whose values differ between the runs, stage
                            by stage; `init_from` becomes the boolean `pretrained`

Tokens count every position of every row, padding included: that is what a step costs.
A run still being written loads up to its last complete row; runs that cannot be read are
named in a warning and in `df.attrs["unreadable"]`.
"""

import json
import math
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gptjax import dialogue_loss
from gptjax import metrics as metrics_lib
from gptjax.errors import UserError

BASE_COLUMNS = ["run", "stage", "split", "step", "tokens", "stage_tokens", "time", "elapsed_s",
                "loss", "assistant_loss", "perplexity", "lr", "grad_norm", "tokens_per_sec"]
# Config keys that never explain a difference in losses: where the data lives, and the
# handoff details that `pretrained` summarises.
_IGNORED_KEYS = ("stage", "init_from", "init_from_step", "data.data_dir")


def paths_from_env(default: list[str], variable: str = "GPTJAX_RUNS") -> list[str]:
  """The workdirs named in $variable (separated by os.pathsep), else `default`."""
  value = os.environ.get(variable, "")
  return [p for p in value.split(os.pathsep) if p] or list(default)


def stage_dirs(path: str) -> list[str]:
  """The stage workdirs of `path` in training order; raises ValueError saying why none."""
  if not os.path.isdir(path):
    raise UserError("no such directory")
  if os.path.exists(os.path.join(path, "config.json")):
    return [path]
  stages = [e.path for e in os.scandir(path)
            if e.is_dir() and os.path.exists(os.path.join(e.path, "config.json"))]
  if not stages:
    raise UserError("not a gptjax workdir (no config.json, nor stage folders holding one)")
  finished = []
  if os.path.exists(os.path.join(path, "pipeline.json")):
    with open(os.path.join(path, "pipeline.json")) as f:
      finished = json.load(f)["finished"]
  # pipeline.json lists finished stages only: the running one follows them, and stages run
  # one after another, so the first row's time orders any others.
  def order(stage_dir):
    name = os.path.basename(stage_dir)
    rows = metrics_lib.read_rows(os.path.join(stage_dir, "metrics.jsonl"))
    rank = finished.index(name) if name in finished else len(finished)
    return rank, rows[0]["time"] if rows else math.inf, name
  return sorted(stages, key=order)


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON text so values stay comparable."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = json.dumps(value) if isinstance(value, list) else value
  return flat


def _read_stage(stage_dir: str, offset: int) -> tuple[pd.DataFrame, dict]:
  """The rows and flat config of one stage workdir, its tokens starting at `offset`."""
  with open(os.path.join(stage_dir, "config.json")) as f:
    config = flatten(json.load(f))
  config["pretrained"] = bool(config.get("init_from"))
  rows = pd.DataFrame(metrics_lib.read_rows(os.path.join(stage_dir, "metrics.jsonl")))
  if rows.empty:
    return rows, config
  rows = rows.rename(columns={"tokens": "eval_tokens"})
  rows["stage_tokens"] = rows["step"] * config["train.batch_size"] * config["data.seq_len"]
  rows["tokens"] = rows["stage_tokens"] + offset
  return rows, config


def _read_run(path: str) -> tuple[pd.DataFrame, dict]:
  """A run's rows and {stage: flat config}; raises ValueError saying why it cannot."""
  frames, configs, offset = [], {}, 0
  for stage_dir in stage_dirs(path):
    try:
      rows, config = _read_stage(stage_dir, offset)
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise UserError(f"{stage_dir} is unreadable ({type(e).__name__}: {e})") from None
    if rows.empty:
      continue  # A stage that has not logged yet (or just started).
    # A pipeline's folder names its stages uniquely; their `stage` keys need not.
    stage = rows["stage"].iloc[0] if stage_dir == path else os.path.basename(stage_dir)
    rows["stage"] = stage
    frames.append(rows)
    configs[stage] = config
    offset = int(rows["tokens"].max())
  if not frames:
    raise UserError("no metrics rows yet")
  run = pd.concat(frames, ignore_index=True)
  run["elapsed_s"] = run["time"] - run["time"].min()
  return run, configs


def _names(paths: list[str]) -> list[str]:
  """The shortest ends of the paths that tell them apart: runs/a/x, runs/b/x -> a/x, b/x."""
  parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
  for depth in range(1, max(len(p) for p in parts) + 1):
    names = ["/".join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return names


def _differing_keys(configs: dict[str, dict[str, dict]]) -> list[str]:
  """Keys whose value differs between runs holding the same stage."""
  keys = set()
  stages = {s for by_stage in configs.values() for s in by_stage}
  for stage in stages:
    flats = [by_stage[stage] for by_stage in configs.values() if stage in by_stage]
    for key in set().union(*flats) - set(_IGNORED_KEYS):
      if len({repr(f.get(key)) for f in flats}) > 1:
        keys.add(key)
  return sorted(keys)


def load(paths: list[str] | str) -> pd.DataFrame:
  """One row a metrics row of every run in `paths` (see the module docstring)."""
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    raise UserError("No workdirs given; pass paths of `gptjax train` or `gptjax pipeline` runs.")
  names, frames, configs, unreadable = _names(paths), [], {}, {}
  for name, path in zip(names, paths):
    try:
      frame, configs[name] = _read_run(path)
    except ValueError as e:
      unreadable[path] = str(e)
      warnings.warn(f"Skipping run {path}: {e}.", stacklevel=2)
      continue
    frame.insert(0, "run", name)
    frames.append(frame)
  if not frames:
    reasons = "; ".join(f"{p}: {why}" for p, why in unreadable.items())
    raise UserError(f"None of the runs could be read: {reasons}; pass workdirs of "
                     "`gptjax train` or `gptjax pipeline` runs.")
  df = pd.concat(frames, ignore_index=True)
  config_columns = _differing_keys(configs)
  for key in config_columns:
    df[key] = [configs[run][stage].get(key) for run, stage in zip(df["run"], df["stage"])]
  extra = [c for c in df.columns if c not in BASE_COLUMNS + config_columns]
  df = df.reindex(columns=BASE_COLUMNS + extra + config_columns)
  df.attrs = {"config_columns": config_columns, "unreadable": unreadable}
  return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
  """The last train and eval values of each run's stages, with the differing config."""
  keys = ["run", "stage"]
  table = df.groupby(keys, sort=False)[["step", "tokens"]].max()
  train = df[df["split"] == "train"].groupby(keys)
  evals = df[df["split"] == "eval"].groupby(keys)
  table["train_loss"] = train["loss"].last()
  for column in ("loss", "perplexity", "assistant_loss"):
    table[f"eval_{column}"] = evals[column].last()
  table["best_eval_loss"] = evals["loss"].min()
  table = table.join(df.groupby(keys)[df.attrs.get("config_columns", [])].first())
  return table.dropna(axis=1, how="all")


def _label(rows: pd.DataFrame, columns: list[str]) -> str:
  """The run's name and its values of the differing config keys."""
  values = ", ".join(f"{c}={rows[c].iloc[0]}" for c in columns)
  return f"{rows['run'].iloc[0]} ({values})" if values else rows["run"].iloc[0]


def _log(x):
  """log, finite where matplotlib probes the perplexity axis at or below zero."""
  return np.log(np.maximum(x, 1e-12))


def _colors(names) -> dict[str, str]:
  """One color a run (or stage), the same in every panel."""
  return {name: f"C{i}" for i, name in enumerate(names.unique())}


def _boundaries(rows: pd.DataFrame) -> dict[str, int]:
  """{stage: tokens where it starts} for every stage of a run after its first."""
  starts = (rows["tokens"] - rows["stage_tokens"]).groupby(rows["stage"], sort=False).min()
  return {stage: int(start) for stage, start in starts.items() if start > 0}


def plot_stages(df: pd.DataFrame) -> plt.Figure:
  """Train and eval loss against tokens seen, a panel a run, stage boundaries marked."""
  runs = df["run"].unique()
  colors = _colors(df["stage"])
  fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.6 * len(runs)), squeeze=False)
  for ax, run in zip(axes[:, 0], runs):
    rows = df[df["run"] == run]
    for stage, part in rows.groupby("stage", sort=False):
      train, evals = part[part["split"] == "train"], part[part["split"] == "eval"]
      ax.plot(train["tokens"], train["loss"], color=colors[stage], label=f"{stage} train")
      if not evals.empty:  # A running stage may not have evaluated yet.
        ax.plot(evals["tokens"], evals["loss"], "o--", color=colors[stage],
                label=f"{stage} eval")
    for stage, start in _boundaries(rows).items():
      ax.axvline(start, color="gray", linestyle=":")
      ax.annotate(f" {stage} starts", (start, 1), xycoords=("data", "axes fraction"),
                  va="top", fontsize=8, color="gray")
    # Perplexity is exp(loss), so one loss axis reads as both.
    ax.secondary_yaxis("right", functions=(np.exp, _log)).set_ylabel("perplexity")
    ax.set(title=run, xlabel="tokens seen", ylabel="loss")
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_comparison(df: pd.DataFrame, metric: str | None = None,
                    stage: str | None = None) -> plt.Figure:
  """`metric` of one stage across runs, train and eval panels, against the stage's tokens.

  `stage` defaults to the stage most runs share (the later one on a tie) and `metric` to
  `assistant_loss` when the stage has it: the loss on reply tokens alone compares runs with
  different loss weights fairly.
  """
  stages = list(df["stage"].unique())
  counts = df.groupby("stage")["run"].nunique()
  stage = stage or max(stages, key=lambda s: (counts[s], stages.index(s)))
  rows = df[df["stage"] == stage]
  if rows.empty:
    raise UserError(f"No run has a stage {stage!r}; the stages loaded are {stages}.")
  metric = metric or ("assistant_loss" if rows["assistant_loss"].notna().any() else "loss")
  columns, colors = df.attrs.get("config_columns", []), _colors(df["run"])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, split in zip(axes, ("train", "eval")):
    for run, part in rows[rows["split"] == split].groupby("run", sort=False):
      ax.plot(part["stage_tokens"], part[metric], "o-" if split == "eval" else "-",
              color=colors[run], label=_label(part, columns))
    ax.set(title=f"{stage} {split} {metric}", xlabel=f"tokens seen in {stage}", ylabel=metric)
  axes[0].legend(fontsize=8)  # Every run with the stage has train rows; evals may lag.
  fig.tight_layout()
  return fig


def plot_optimizer(df: pd.DataFrame) -> plt.Figure:
  """Learning rate and gradient norm against tokens seen, and tokens/s against wall time."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  colors = _colors(df["run"])
  for run, rows in df[df["split"] == "train"].groupby("run", sort=False):
    axes[0].plot(rows["tokens"], rows["lr"], color=colors[run], label=run)
    axes[1].plot(rows["tokens"], rows["grad_norm"], color=colors[run], label=run)
    axes[2].plot(rows["elapsed_s"], rows["tokens_per_sec"], ".-", color=colors[run], label=run)
    for start in _boundaries(rows).values():
      axes[0].axvline(start, color=colors[run], linestyle=":")
      axes[1].axvline(start, color=colors[run], linestyle=":")
  axes[0].set(title="learning rate", xlabel="tokens seen", ylabel="lr")
  axes[1].set(title="gradient norm (before clipping)", xlabel="tokens seen", ylabel="grad_norm",
              yscale="log")
  axes[2].set(title="throughput", xlabel="seconds since the run's first row",
              ylabel="tokens/s")
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  return fig


def structure(df: pd.DataFrame) -> pd.DataFrame:
  """The loss by dialogue structure (gptjax/dialogue_loss.py) of each run's stages' last
  evaluation that has it: one row a (run, stage), a column a `loss_role_*`/`loss_turn_*`
  metric and its `tokens_*` count."""
  losses = [c for c in dialogue_loss.metric_names() if c in df.columns]
  if not losses:
    return pd.DataFrame()
  rows = df[(df["split"] == "eval") & df[losses].notna().any(axis=1)]
  counts = [c.replace("loss_", "tokens_", 1) for c in losses]
  return rows.groupby(["run", "stage"], sort=False)[
      ["step", *losses, *[c for c in counts if c in df.columns]]].last()


def plot_structure(df: pd.DataFrame) -> plt.Figure:
  """Reply loss by the reply's index in its conversation, and loss by role, a line a run and
  stage, from their last evaluation (see `structure`)."""
  table = structure(df)
  if table.empty:
    raise UserError("No run has an evaluation with loss by dialogue structure (loss_turn_* "
                    "columns); evaluate a dialogue stage whose batches carry role and turn rows.")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for panel, prefix, title in ((0, "loss_turn_", "reply loss by reply index"),
                               (1, "loss_role_", "loss by role")):
    columns = [c for c in table.columns if c.startswith(prefix)]
    labels = [c[len(prefix):].replace("plus", "+") for c in columns]
    for (run, stage), row in table.iterrows():
      axes[panel].plot(labels, row[columns].to_numpy(float), "o-", label=f"{run} {stage}")
    axes[panel].set(title=title, ylabel="loss (nats a token)",
                    xlabel="reply in the conversation" if panel == 0 else "role")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  return fig


def save(fig: plt.Figure, folder: str, name: str):
  """Writes `fig` to folder/name.png; does nothing when `folder` is empty."""
  if folder:
    os.makedirs(folder, exist_ok=True)
    fig.savefig(os.path.join(folder, name + ".png"), dpi=120, bbox_inches="tight")
