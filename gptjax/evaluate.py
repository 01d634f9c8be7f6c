"""Evaluation: loss, perplexity and reply-only loss over every token of an eval set once."""

import math

import dataclasses

import jax
import jax.numpy as jnp

from gptjax import checkpoint as ckpt_lib
from gptjax import classify as classify_lib
from gptjax import config as config_lib
from gptjax import datasets
from gptjax import dialogue_loss
from gptjax import lora as lora_lib
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError


def evaluate(programs, params, batches: list[dict], confusion: bool = False) -> dict:
  """Metrics over `batches` (global numpy batches, identical on every process).

  Returns `loss` (the weighted objective), `perplexity`, `tokens` (target tokens that are
  not padding), `weight_sum` (their summed loss weights, the loss's denominator) and, for
  dialogue batches, `assistant_loss` and `assistant_tokens`, and when they carry `role` and
  `turn` rows, the loss by dialogue structure (gptjax/dialogue_loss.py).
  For classification batches, `accuracy`, `macro_f1` and with `confusion` the confusion
  matrix [true][predicted].
  """
  sums = None
  for batch in batches:
    rows = batch["inputs"].shape[0] // jax.process_count()
    lo = jax.process_index() * rows
    local = {k: v[lo:lo + rows] for k, v in batch.items()}
    out = programs.eval_step(params, sharding.global_batch(local, programs.batch_sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise UserError("The eval set produced no batch; check data.eval_split / "
                    "data.eval_files.")
  sums = jax.device_get(sums)
  matrix = sums.pop("confusion", None)
  sums = {k: float(v) for k, v in sums.items()}
  loss = sums["loss_sum"] / max(sums["weight_sum"], 1.0)
  metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
             "tokens": sums["token_count"], "weight_sum": sums["weight_sum"]}
  if "assistant_sum" in sums:
    metrics["assistant_loss"] = sums["assistant_sum"] / max(sums["assistant_count"], 1.0)
    metrics["assistant_tokens"] = sums["assistant_count"]
  if matrix is not None:
    metrics.update(classify_lib.scores(matrix))
    if confusion:
      metrics["confusion"] = matrix.astype(int).tolist()
  return metrics | dialogue_loss.structure_metrics(sums)


def eval_workdir(workdir: str, *, split: str | None = None, step: str | None = None,
                 mesh=None) -> dict:
  """Evaluates a run's checkpoint (latest, "best" or a number) on its eval set or `split`.

  For a dialogue run trained on JSONL files, `split` may be a JSONL path.
  """
  config = workdir_lib.read_config(workdir)
  # A missing checkpoint is an error before the eval set is built and the step compiled.
  ckpt_lib.resolve_step(workdir_lib.checkpoint_dir(workdir), step)
  if split:
    config = config.replace(data=with_eval_split(config.data, split))
  mesh = mesh or sharding.make_mesh(config.mesh.sizes)
  tokenizer = workdir_lib.load_tokenizer(workdir)
  batches, _ = datasets.eval_batches(config, tokenizer)
  if not batches:
    raise UserError(f"{workdir} has no eval set configured; pass --split NAME.")
  # A LoRA run evaluates as the plain model its adapters fold into.
  programs = steps_lib.compile_programs(config.replace(lora={"rank": 0}), mesh)
  params, step_number = lora_lib.load_checkpoint(workdir, step,
                                                  programs.abstract_state().params)
  metrics = {"step": step_number, "split": split or eval_name(config.data),
             **evaluate(programs, params, batches, confusion=True)}
  if "confusion" in metrics:
    metrics["labels"] = list(config.classify.label_names)
  return metrics


def with_eval_split(d: config_lib.DataConfig, split: str) -> config_lib.DataConfig:
  """`d` evaluating on `split`: a split name or a JSONL file."""
  if split.endswith(".jsonl"):
    # train_files selects the file-based source for both sides.
    return dataclasses.replace(d, eval_files=split, train_files=d.train_files or split)
  # Per-entry splits (NAME:TRAIN:EVAL) off: the named split applies to every dataset.
  return dataclasses.replace(d, eval_split=split, dataset=",".join(
      e.split(":")[0] for e in d.dataset.split(",")))


def eval_name(d: config_lib.DataConfig) -> str:
  """The name of what `d` evaluates on: its JSONL files or its eval split."""
  return d.eval_files if d.kind == "dialogue" and d.train_files else d.eval_split
