"""Sequence classification: a stage kind (data.kind="classify") that reads a label off the
final hidden state of each text.

A row is one text: [BOS] + its tokens, cut to data.seq_len, right-padded (segment id 0).
The head, `classifier` {kernel [D, C], bias [C]}, sits beside the Transformer's parameters and
reads the final-norm hidden state of the last real token of the row (`classify.pool="last"`,
found from the segment ids, never position -1 of a padded row) or their mean over the real
tokens ("mean"). The loss is the cross-entropy of the label, one weight a row (padding rows of
a short last batch weigh 0). Batches keep the [B, L] layout of every stage: `targets` holds
the label at every position and `weights` the row's weight at every position.

Data: a tfds dataset by name (`data.text_field` and `classify.label_field`; labels as strings
or ClassLabel integers), the first user message of a schema_guided_dialogue dialogue with its
service or domain as label (SOURCES), or JSONL files of {"text": ..., "label": ...}. The label
list is `classify.labels`, recorded in config.json. A bad record (no label, a label not in the
list, empty text, wrong types) is skipped and counted with its file and line, or stops the run
with data.strict.
"""

import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import data as data_lib
from gptjax import dialogue
from gptjax import loss as loss_lib
from gptjax.errors import UserError

HEAD = "classifier"  # The head's key in the parameters.
POOLS = ("last", "mean")


class BadRecord(ValueError):
  """A record that cannot be a (text, label) example."""


# ----------------------------------------------------------------------------- data


def _sgd_first_user(record, label: str) -> tuple[str, str]:
  """schema_guided_dialogue: (the first user utterance, the dialogue's first service, or its
  domain: the service name before "_", e.g. Restaurants_1 -> Restaurants)."""
  utterances = record["utterances"]
  first = 0 if int(record["first_speaker"]) == 0 else 1
  services = record["metadata"]["services"]["name"]
  if len(utterances) <= first or len(services) == 0:
    raise BadRecord("no user utterance or no service")
  service = _text(services[0])
  return _text(utterances[first]), service.split("_")[0] if label == "domain" else service


# tfds datasets read by a converter instead of (text_field, label_field).
SOURCES = {"schema_guided_dialogue": _sgd_first_user}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _report(source: str) -> dialogue.LoadReport:
  """Bad records are counted and located as the dialogue stage's are."""
  return dialogue.LoadReport(source, unit="examples")


def check_example(text, label, labels: tuple[str, ...], names=None) -> tuple[str, int]:
  """(text, label index) of one record, or BadRecord saying what is wrong."""
  text = _text(text)
  if not isinstance(text, str):
    raise BadRecord(f"text is a {type(text).__name__}, not a string")
  if not text.strip():
    raise BadRecord("empty text")
  if label is None:
    raise BadRecord("no label")
  if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
    if names is None:  # A bare integer label indexes classify.labels.
      names = labels
    if not 0 <= int(label) < len(names):
      raise BadRecord(f"label {int(label)} is outside the {len(names)} classes")
    label = names[int(label)]
  label = _text(label)
  if not isinstance(label, str):
    raise BadRecord(f"label is a {type(label).__name__}, not a string or integer")
  if label not in labels:
    raise BadRecord(f"label {label!r} is not one of classify.labels")
  return text, labels.index(label)


def read_jsonl(path: str, labels, strict: bool) -> tuple[list[tuple[str, int]], dialogue.LoadReport]:
  """Examples of a JSONL file of {"text", "label"} objects."""
  if not os.path.exists(path):
    raise UserError(f"Classification file {path} does not exist; pass a JSONL file with one "
                    '{"text": ..., "label": ...} object a line.')
  report, examples = _report(path), []
  for where, record in dialogue.jsonl_objects(path, report, strict):
    try:
      examples.append(check_example(record.get("text"), record.get("label"), labels))
    except BadRecord as e:
      report.skip(where, str(e), strict)
  report.used = len(examples)
  return examples, report


def read_tfds(name: str, split: str, config, strict: bool):
  """Examples of a tfds split: by SOURCES, else its text and label features."""
  d, c = config.data, config.classify
  source = data_lib.load_source(name, split, d.data_dir)
  report, examples = _report(f"{name}[{split}]"), []
  for index in range(len(source)):
    try:
      record = source[index]
      if name in SOURCES:
        text, label = SOURCES[name](record, c.label_field)
      else:
        if d.text_field not in record or c.label_field not in record:
          raise BadRecord(f"no {d.text_field!r} or {c.label_field!r} feature")
        text, label = record[d.text_field], record[c.label_field]
        label = label.item() if isinstance(label, np.ndarray) and label.ndim == 0 else label
      examples.append(check_example(text, label, c.label_names))
    except BadRecord as e:
      report.skip(f"{name}[{split}] record {index}", str(e), strict)
  report.used = len(examples)
  return examples, report


def examples(config, which: str) -> tuple[list[tuple[str, int]], list[str]]:
  """(examples, notes) of the train or eval side of a classification stage."""
  d = config.data
  if d.train_files:
    files = d.train_files if which == "train" else d.eval_files
    out, notes = [], []
    for path in (p.strip() for p in files.split(",") if p.strip()):
      found, report = read_jsonl(path, config.classify.label_names, d.strict)
      out += found
      notes.append(report.summary())
  else:
    split = d.train_split if which == "train" else d.eval_split
    out, report = read_tfds(d.dataset, split, config, d.strict)
    notes = [report.summary()]
  if not out:
    raise UserError(f"{'; '.join(notes)}: no usable {which} example; check the data source "
                    "and classify.labels.")
  return out, notes


def encode(tokenizer, text: str, seq_len: int) -> np.ndarray:
  """[BOS] + the text's tokens, cut to seq_len."""
  return np.asarray([tokenizer.bos_id, *tokenizer.encode(text)][:seq_len], np.int32)


def to_row(tokens: np.ndarray, label: int, seq_len: int) -> dict:
  """One [seq_len] row per key (see the module docstring)."""
  n = len(tokens)
  row = {k: np.zeros(seq_len, dtype) for k, dtype in data_lib.ROW_DTYPES.items()}
  row["inputs"][:n] = tokens
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n)
  row["targets"][:] = label
  row["weights"][:] = 1.0
  return row


def train_dataset(config, tokenizer, *, batch_size: int, shard_index: int = 0,
                  shard_count: int = 1):
  """(endless shuffled batches of this process's rows, notes)."""
  found, notes = examples(config, "train")
  seq_len = config.data.seq_len
  items = [(encode(tokenizer, text, seq_len), label) for text, label in found]
  ds = grain.MapDataset.source(items)[shard_index::shard_count].shuffle(
      seed=config.train.seed).repeat(None)
  ds = ds.map(lambda item: to_row(item[0], item[1], seq_len))
  return data_lib.batch_rows(ds.to_iter_dataset(), batch_size=batch_size), notes


def eval_batches(config, tokenizer) -> tuple[list[dict], list[str]]:
  """(global eval batches covering every eval example once, notes)."""
  d = config.data
  if not (d.eval_files if d.train_files else d.eval_split):
    return [], []
  found, notes = examples(config, "eval")
  rows = [to_row(encode(tokenizer, text, d.seq_len), label, d.seq_len) for text, label in found]
  size, batches = config.train.batch_size, []
  for start in range(0, len(rows), size):
    # Zero rows (weight 0) fill the last batch: shapes stay static.
    batch = {k: np.zeros((size, d.seq_len), dtype) for k, dtype in data_lib.ROW_DTYPES.items()}
    for i, row in enumerate(rows[start:start + size]):
      for k, v in row.items():
        batch[k][i] = v
    batches.append(batch)
  return batches[:d.eval_batches or None], notes


def tokenizer_texts(config) -> list[str]:
  return [text for text, _ in examples(config, "train")[0]]


# ----------------------------------------------------------------------------- model


def init_head(rng, d_model: int, num_classes: int) -> dict:
  """The head's boxed parameters (kernel N(0, 0.02), bias 0)."""
  kernel = 0.02 * jax.random.normal(rng, (d_model, num_classes), jnp.float32)
  return {"kernel": nn.LogicallyPartitioned(kernel, names=("embed", None)),
          "bias": nn.LogicallyPartitioned(jnp.zeros((num_classes,), jnp.float32),
                                          names=(None,))}


def pooled(hidden_BLD, segment_ids_BL, pool: str):
  """[B, D]: the hidden state of each row's last real token, or the mean over its real ones."""
  real_BL = (segment_ids_BL > 0).astype(jnp.float32)
  if pool == "mean":
    return (hidden_BLD * real_BL[..., None]).sum(1) / jnp.maximum(real_BL.sum(1), 1.0)[:, None]
  last_B = jnp.maximum(real_BL.sum(1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]


def logits(params, batch, *, model, pool: str, train: bool = False, rng=None,
           embed_delta_BLD=None):
  """Class logits [B, C] (float32)."""
  body = {k: v for k, v in params.items() if k != HEAD}
  hidden_BLD = model.apply({"params": body}, batch["inputs"], batch["segment_ids"],
                           batch["positions"], deterministic=not train,
                           rngs={"dropout": rng} if train else {},
                           embed_delta_BLD=embed_delta_BLD, return_hidden=True)
  head = params[HEAD]
  return pooled(hidden_BLD, batch["segment_ids"], pool) @ head["kernel"] + head["bias"]


def sums(logits_BC, batch, num_classes: int, confusion: bool = False) -> dict:
  """Summed loss (row-weighted), weight, correct rows and optionally the confusion matrix
  [true, predicted]; `token_count` counts real tokens like the language-model loss."""
  labels_B, w_B = batch["targets"][:, 0], batch["weights"][:, 0].astype(jnp.float32)
  nll_B = loss_lib.token_nll(logits_BC, labels_B)
  predicted_B = jnp.argmax(logits_BC, axis=-1)
  out = {"loss_sum": (nll_B * w_B).sum(), "weight_sum": w_B.sum(),
         "correct_sum": ((predicted_B == labels_B) * w_B).sum(),
         "token_count": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}
  if confusion:
    out["confusion"] = (jax.nn.one_hot(labels_B, num_classes)[:, :, None]
                        * jax.nn.one_hot(predicted_B, num_classes)[:, None, :]
                        * w_B[:, None, None]).sum(0)
  return out


def loss_sums_fn(*, model, pool: str, num_classes: int):
  """The train step's loss (steps.grads_and_sums' `loss_sums_fn`)."""

  def fn(params, batch, rng, embed_delta_BLD):
    out = sums(logits(params, batch, model=model, pool=pool, train=True, rng=rng,
                      embed_delta_BLD=embed_delta_BLD), batch, num_classes)
    return out["loss_sum"], out

  return fn


def eval_step(params, batch, *, model, pool: str, num_classes: int):
  return sums(logits(params, batch, model=model, pool=pool), batch, num_classes,
              confusion=True)


def scores(confusion) -> dict:
  """accuracy and macro-F1 (the mean over classes of F1; a class never true nor predicted
  counts F1 1) of a confusion matrix [true, predicted]."""
  m = np.asarray(confusion, np.float64)
  tp = np.diag(m)
  predicted, true = m.sum(0), m.sum(1)
  denom = predicted + true
  f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 1.0)
  return {"accuracy": float(tp.sum() / max(m.sum(), 1.0)), "macro_f1": float(f1.mean())}


# ----------------------------------------------------------------------------- predicting


def classify_texts(workdir: str, texts: list[str], step=None, mesh=None) -> list[dict]:
  """[{"text", "label", "probabilities": {label: p}}] from a classification run."""
  # pylint: disable=import-outside-toplevel  (steps and lora import this module)
  from gptjax import lora as lora_lib
  from gptjax import sharding
  from gptjax import steps as steps_lib
  from gptjax import workdir as workdir_lib

  config = workdir_lib.read_config(workdir)
  if config.data.kind != "classify":
    raise UserError(f"{workdir} is not a classification run (data.kind={config.data.kind!r}); "
                    "pass the --workdir of a data.kind='classify' stage.")
  for i, text in enumerate(texts):
    if not text.strip():
      raise UserError(f"Text {i} is empty; give every --text some text.")
  tokenizer = workdir_lib.load_tokenizer(workdir)
  mesh = mesh or sharding.make_mesh(config.mesh.sizes)
  plain = config.replace(lora={"rank": 0})
  programs = steps_lib.compile_programs(plain, mesh)
  params, _ = lora_lib.load_checkpoint(workdir, step, programs.abstract_state().params)
  seq_len, labels = config.data.seq_len, config.classify.label_names
  rows = [to_row(encode(tokenizer, t, seq_len), 0, seq_len) for t in texts]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  probs = jax.device_get(jax.nn.softmax(jax.jit(
      lambda p, b: logits(p, b, model=programs.model, pool=config.classify.pool))(
          params, batch), axis=-1))
  return [{"text": t, "label": labels[int(np.argmax(p))],
           "probabilities": {name: float(x) for name, x in zip(labels, p)}}
          for t, p in zip(texts, probs)]
