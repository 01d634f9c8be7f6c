"""What a stage trains and evaluates on, from its `config.data`: documents or conversations.

`data.kind="text"` reads tfds text datasets (and dialogue datasets as plain transcripts) as
pretraining documents; `data.kind="dialogue"` reads conversations from tfds dialogue datasets
or JSONL chat files and renders them with the chat template and `dialogue.history_weight`.
Both go through the same grain pipeline (gptjax/data.py).
"""

import functools
import itertools
from collections.abc import Iterator

import grain
import ml_collections

from gptjax import classify
from gptjax import data as data_lib
from gptjax import dialogue
from gptjax.errors import UserError
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


def text_documents(d, which: str) -> data_lib.TextChunks:
  """Pretraining documents of every dataset in `data.dataset`, for "train" or "eval": a lazy
  sequence (records are read by index when a document is needed)."""
  parts = []
  for name, split in _entries(d, which):
    source = grain.MapDataset.source(data_lib.load_source(name, split, d.data_dir))
    if name in dialogue.TFDS_DIALOGUES:
      parts.append(source.map(functools.partial(_transcript, dialogue.TFDS_DIALOGUES[name])))
    else:
      parts.append(source.map(functools.partial(data_lib.record_text, field=d.text_field)))
  return data_lib.TextChunks(grain.MapDataset.concatenate(parts), d.chunk_chars)


def check_present(d) -> None:
  """Every tfds split `data` names is prepared (else DatasetNotFoundError, naming it); cheap:
  reads the datasets' metadata only. JSONL files are checked by workdir.resolve."""
  for which in ("train", "eval"):
    files = d.train_files if which == "train" else d.eval_files
    if files or (which == "eval" and not has_eval(d)):
      continue
    for name, split in _entries(d, which):
      data_lib.load_source(name, split, d.data_dir)


def _transcript(to_messages, record) -> str:
  """A dialogue record as pretraining text; "" (no document) for a bad record."""
  try:
    return dialogue.as_text(dialogue.check_conversation(to_messages(record)))
  except dialogue.BadConversation:
    return ""


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


def tokenizer_texts(config) -> Iterator[str]:
  """Training texts for the tokenizer, lazily, in a seeded order of the train split's
  documents, so the trainer's `tokenizer.max_chars` cap reads a bounded sample of every
  dataset."""
  d = config.data
  if d.kind == "classify":
    texts = grain.MapDataset.source(classify.tokenizer_texts(config))
  elif d.kind == "dialogue":
    convs = conversations(d, "train")[0]
    texts = grain.MapDataset.source(convs).map(dialogue.as_text)
  else:
    texts = grain.MapDataset.source(text_documents(d, "train"))
  shuffled = texts.shuffle(seed=config.train.seed)  # An index permutation: nothing copied.
  return (shuffled[i] for i in range(len(shuffled)))


def _documents(config, tokenizer: Tokenizer, which: str):
  """(items, to_document, extra_keys, notes) for the train or eval side of a stage."""
  d = config.data
  if d.kind == "text":
    return (text_documents(d, which), functools.partial(data_lib.tokenize_document,
                                                        tokenizer=tokenizer), (), [])
  convs, reports = conversations(d, which)
  where = [w for report in reports for w in report.where]
  long = config.dialogue.long_conversations
  if long not in LONG_CONVERSATIONS:
    raise UserError(f"dialogue.long_conversations={long!r} is not one of "
                    f"{LONG_CONVERSATIONS}; set --config.dialogue.long_conversations.")
  rendered, cut = [], 0
  for messages, source in zip(convs, where):
    if long == "windows":
      windows = dialogue.render_windows(messages, tokenizer, d.seq_len + 1,
                                        history_weight=config.dialogue.history_weight)
      was_cut = len(windows) > 1
    else:
      window, was_cut = dialogue.render_fitting(messages, tokenizer, d.seq_len + 1,
                                                history_weight=config.dialogue.history_weight)
      windows = [window]
    for window in windows:
      if len(window.tokens) > d.seq_len + 1:
        raise UserError(
            f"{source}: one exchange (a user turn and its reply) renders to "
            f"{len(window.tokens)} tokens, more than a row of data.seq_len={d.seq_len} holds "
            f"({d.seq_len + 1}); expected every exchange to fit, since a conversation is "
            "never split across rows; raise data.seq_len or remove that conversation.")
      rendered.append({**dialogue.conversation_document(window), "source": source})
    cut += was_cut
  notes = [r.summary() for r in reports]
  if cut:
    fate = (f"were split into {len(rendered) - (len(convs) - cut)} windows"
            if long == "windows" else "were cut to their most recent turns "
            "(dialogue.long_conversations=\"windows\" would train on all their replies)")
    notes.append(f"{cut} of {len(convs)} {which} conversations were longer than seq_len="
                 f"{d.seq_len} and {fate}.")
  return rendered, (lambda doc: doc), ("assistant", "role", "turn"), notes


# Train rows the packing-efficiency note measures (a fresh iterator's first ones).
EFFICIENCY_ROWS = 512


def _packing_note(which: str, kind: str, batches, rows: int) -> str:
  how = ("conversations packed whole, best fit" if kind == "dialogue"
         else "text concatenated and split")
  return (f"Packing efficiency ({which}, {how}): {data_lib.packing_efficiency(batches):.1%} "
          f"of row positions hold real tokens ({rows} rows measured).")


def _make(config, items, to_document, extra, **kwargs):
  return data_lib.make_dataset(items, to_document, seq_len=config.data.seq_len,
                               seed=config.train.seed, extra_keys=extra,
                               whole=config.data.kind == "dialogue", **kwargs)


def train_dataset(config, tokenizer: Tokenizer, *, batch_size: int, shard_index: int = 0,
                  shard_count: int = 1):
  """(endless train batches of this process's `batch_size` rows, notes for the console)."""
  if config.data.kind == "classify":
    return classify.train_dataset(config, tokenizer, batch_size=batch_size,
                                  shard_index=shard_index, shard_count=shard_count)
  _check_kind(config.data.kind)
  items, to_document, extra, notes = _documents(config, tokenizer, "train")
  ds = _make(config, items, to_document, extra, batch_size=batch_size,
             shard_index=shard_index, shard_count=shard_count)
  count = -(-EFFICIENCY_ROWS // batch_size)
  notes.append(_packing_note("train", config.data.kind, itertools.islice(ds, count),
                             count * batch_size))
  return ds, notes


def eval_batches(config, tokenizer: Tokenizer):
  """(global eval batches, notes): every token of the eval set once, at most
  `data.eval_batches` batches (0: all)."""
  if config.data.kind == "classify":
    return classify.eval_batches(config, tokenizer)
  _check_kind(config.data.kind)
  if not has_eval(config.data):
    return [], []
  items, to_document, extra, notes = _documents(config, tokenizer, "eval")
  # Every process reads the whole (small) eval set in the same order and evaluates its slice
  # of each global batch, so all processes run the same number of eval steps.
  # Shuffled once with a fixed seed: a capped eval (data.eval_batches) then samples every
  # dataset of a mixture rather than only the first one.
  ds = _make(config, items, to_document, extra, batch_size=config.train.batch_size,
             shuffle=True, num_epochs=1)
  limit = config.data.eval_batches
  batches = [batch for _, batch in zip(range(limit) if limit else iter(int, 1), ds)]
  if batches:
    notes.append(_packing_note("eval", config.data.kind, batches,
                               len(batches) * config.train.batch_size))
  return batches, notes


def _check_kind(kind: str):
  if kind not in KINDS:
    raise UserError(f"data.kind={kind!r} is not one of {KINDS}; set --config.data.kind.")
