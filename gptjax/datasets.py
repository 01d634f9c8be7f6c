"""What a stage trains and evaluates on, from its `config.data`: documents or conversations.

`data.kind="text"` reads tfds text datasets (and dialogue datasets as plain transcripts) as
pretraining documents; `data.kind="dialogue"` reads conversations from tfds dialogue datasets
or JSONL chat files and renders them with the chat template and `dialogue.history_weight`.
Both go through the same grain pipeline (gptjax/data.py).
"""

import functools

import ml_collections
import numpy as np

from gptjax import data as data_lib
from gptjax import dialogue
from gptjax.tokenizer import Tokenizer

KINDS = ("text", "dialogue")
LONG_CONVERSATIONS = ("recent", "windows")  # dialogue.long_conversations: see config.py.


def _entries(d: ml_collections.ConfigDict, which: str) -> list[tuple[str, str]]:
  """(dataset, split) pairs of `data.dataset` for "train" or "eval"."""
  pairs = []
  for entry in filter(None, (e.strip() for e in d.dataset.split(","))):
    name, *splits = entry.split(":")
    train_split, eval_split = (splits + [None, None])[:2] if splits else (None, None)
    split = (train_split or d.train_split) if which == "train" else (eval_split or d.eval_split)
    pairs.append((name, split))
  return pairs


def has_eval(d: ml_collections.ConfigDict) -> bool:
  if d.kind == "dialogue" and d.train_files:
    return bool(d.eval_files)
  return bool(d.eval_split)


def text_documents(d: ml_collections.ConfigDict, which: str) -> list[str]:
  """Pretraining documents of every dataset in `data.dataset`, for "train" or "eval"."""
  documents = []
  for name, split in _entries(d, which):
    if name in dialogue.TFDS_DIALOGUES:
      conversations, _ = dialogue.read_tfds(name, split, d.data_dir)
      documents += [dialogue.as_text(c) for c in conversations]
    else:
      source = data_lib.load_source(name, split, d.data_dir)
      documents += data_lib.text_documents(source, field=d.text_field,
                                           chunk_chars=d.chunk_chars)
  return documents


def conversations(d: ml_collections.ConfigDict, which: str):
  """(conversations, load reports) from JSONL files or tfds dialogue datasets."""
  files = d.train_files if which == "train" else d.eval_files
  if files:
    specs = [(f.strip(), "") for f in files.split(",") if f.strip()]
  else:
    specs = _entries(d, which)
  out, reports = [], []
  for spec, split in specs:
    convs, report = dialogue.load(spec, split, d.data_dir, strict=d.strict)
    out += convs
    reports.append(report)
  return out, reports


def tokenizer_texts(config: ml_collections.ConfigDict) -> list[str]:
  """Training texts for the tokenizer: the train split's documents, in a seeded order so a
  `tokenizer.max_chars` cap samples every dataset."""
  d = config.data
  if d.kind == "dialogue":
    texts = [dialogue.as_text(c) for c in conversations(d, "train")[0]]
  else:
    texts = text_documents(d, "train")
  order = np.random.default_rng(config.train.seed).permutation(len(texts))
  return [texts[i] for i in order]


def _documents(config, tokenizer: Tokenizer, which: str):
  """(items, to_document, extra_keys, notes) for the train or eval side of a stage."""
  d = config.data
  if d.kind == "text":
    return (text_documents(d, which), functools.partial(data_lib.tokenize_document,
                                                        tokenizer=tokenizer), (), [])
  convs, reports = conversations(d, which)
  long = config.dialogue.long_conversations
  if long not in LONG_CONVERSATIONS:
    raise ValueError(f"dialogue.long_conversations={long!r} is not one of "
                     f"{LONG_CONVERSATIONS}; set --config.dialogue.long_conversations.")
  rendered, cut = [], 0
  for messages in convs:
    if long == "windows":
      windows = dialogue.render_windows(messages, tokenizer, d.seq_len + 1,
                                        history_weight=config.dialogue.history_weight)
      was_cut = len(windows) > 1
    else:
      window, was_cut = dialogue.render_fitting(messages, tokenizer, d.seq_len + 1,
                                                history_weight=config.dialogue.history_weight)
      windows = [window]
    rendered += [dialogue.conversation_document(w) for w in windows]
    cut += was_cut
  notes = [r.summary() for r in reports]
  if cut:
    fate = (f"were split into {len(rendered) - (len(convs) - cut)} windows"
            if long == "windows" else "were cut to their most recent turns "
            "(dialogue.long_conversations=\"windows\" would train on all their replies)")
    notes.append(f"{cut} of {len(convs)} {which} conversations were longer than seq_len="
                 f"{d.seq_len} and {fate}.")
  return rendered, (lambda doc: doc), ("assistant", "role", "turn"), notes


def train_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, batch_size: int,
                  shard_index: int = 0, shard_count: int = 1):
  """(endless train batches of this process's `batch_size` rows, notes for the console)."""
  _check_kind(config.data.kind)
  items, to_document, extra, notes = _documents(config, tokenizer, "train")
  ds = data_lib.make_dataset(items, to_document, seq_len=config.data.seq_len,
                             batch_size=batch_size, seed=config.train.seed,
                             shard_index=shard_index, shard_count=shard_count, extra_keys=extra)
  return ds, notes


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer):
  """(global eval batches, notes): every token of the eval set once, at most
  `data.eval_batches` batches (0: all)."""
  _check_kind(config.data.kind)
  if not has_eval(config.data):
    return [], []
  items, to_document, extra, notes = _documents(config, tokenizer, "eval")
  # Every process reads the whole (small) eval set in the same order and evaluates its slice
  # of each global batch, so all processes run the same number of eval steps.
  # Shuffled once with a fixed seed: a capped eval (data.eval_batches) then samples every
  # dataset of a mixture rather than only the first one.
  ds = data_lib.make_dataset(items, to_document, seq_len=config.data.seq_len,
                             batch_size=config.train.batch_size, seed=config.train.seed,
                             shuffle=True, num_epochs=1, extra_keys=extra)
  limit = config.data.eval_batches
  return [batch for _, batch in zip(range(limit) if limit else iter(int, 1), ds)], notes


def _check_kind(kind: str):
  if kind not in KINDS:
    raise ValueError(f"data.kind={kind!r} is not one of {KINDS}; set --config.data.kind.")
