"""Training data: tfds sources -> documents -> packed rows -> grain batches.

Every batch is a dict of numpy arrays of shape [batch, seq_len]:

  inputs      int32    token ids fed to the model (pad id 0 on padding)
  targets     int32    the next token of each input
  weights     float32  loss weight of each target; 0 on padding
  segment_ids int32    1, 2, 3, ... per packed document inside a row; 0 on padding
  positions   int32    position within its segment, 0 at each segment start

A document may carry more per-token arrays than `weights` (the dialogue stage adds
`assistant`, 1 on reply tokens); each is shifted onto targets like `weights` and becomes a
float32 row of that name (`extra_keys`).

Documents. A document is a token sequence with one loss weight per token ([bos] + text +
[eos] with weights 1 for pretraining; the dialogue stage brings its own weights and names its
conversation in `source`). It yields the pairs (tokens[:-1] -> tokens[1:]) with weights[1:].
Documents stream: texts are read by index from a random-access source (a tfds data source,
never a list of the whole dataset) and shuffled per epoch by an index permutation. Long
texts are cut into chunks (chunk_text); TextChunks counts each record's chunks in one pass
(8 bytes a record) and re-reads a record to give one of its chunks, so memory holds a few
records, never the corpus.

Packing, two ways:

  * Concat-and-split (pretraining text, `whole=False`). Pairs are written greedily, in order,
    into rows of seq_len; a document longer than the space left in a row fills the row and
    continues at the start of the next row as a new segment. Nothing is wasted: a row is
    full unless the input ended.
  * Whole documents, best fit (dialogue, `whole=True`). A conversation (one rendering or one
    window of it) is never split across rows: a reply separated from the turns before it
    would train without its context. The packer keeps a buffer of up to `buffer_size`
    pending documents in read order. Each row opens with the oldest pending document (so
    none waits more than `buffer_size` rows), then repeatedly takes the longest pending
    document that still fits the space left (the earliest read on ties), refilling the
    buffer after each, until none fits; the rest of the row is padding. The result depends
    only on the input order, which the seed fixes. A document longer than a row is a
    UserError naming it (`recent` and `windows` rendering keep conversations short enough).

Invariants:

  * no attention across documents: each document piece has its own segment id in its row;
  * positions restart at 0 at every segment start (also for a continued document);
  * every target of every document appears exactly once per pass over the documents;
  * with `whole=True`, every document is one segment of one row: its targets all see the
    tokens before them in the same segment (no reply without its history);
  * all padding has weight 0 and segment id 0; with `whole=False` padding exists only in the
    last row of a finite pass (and in rows added to fill its last batch).

Checkpoint state is small, JSON-serialisable, and restoring it yields exactly the rows an
uninterrupted iterator would. Concat-and-split: the input state from before the current
document plus the number of its pairs already written. Best fit: the input state from before
the oldest pending document, the number of documents read since, and which of them are still
pending; restoring re-reads those (at most about buffer_size rows' worth) to rebuild the
buffer.

Packing efficiency is the fraction of a row's positions that hold a real token
(`packing_efficiency`); the stage reports it for its train and eval data.
"""

import collections.abc
import copy
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from gptjax.errors import UserError
from gptjax.tokenizer import PAD_ID, Tokenizer

ROW_DTYPES = {
    "inputs": np.int32,
    "targets": np.int32,
    "weights": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
# Zero-filled rows are padding: pad token, weight 0, segment 0.
assert PAD_ID == 0
# Documents are read, tokenized and packed in this thread: the grain state stays exact and
# tokenizing is cheap next to a train step.
_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Pending conversations the best-fit packer chooses from: enough to fill rows densely, few
# enough that restoring its state re-reads only a few rows' worth of documents.
BEST_FIT_BUFFER = 64
# Records whose chunks TextChunks keeps at hand: shuffled reads of one long record (all of
# tiny_shakespeare is one) then chunk it once, not once a chunk.
CACHED_RECORDS = 8


class DatasetNotFoundError(UserError):
  """A tfds dataset or split is not prepared in the data directory searched."""


def load_source(name: str, split: str, data_dir: str | None = None) -> Sequence[Any]:
  """Random-access records of a prepared tfds dataset split (array_record format)."""
  import tensorflow_datasets as tfds  # Heavy import, only needed to read data.

  searched = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  fix = (f"run `python -m gptjax prepare --dataset {name} --data_dir DIR` and pass that "
         "data_dir (or set TFDS_DATA_DIR=DIR)")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is unknown to tfds and not found in "
        f"{searched}; expected a prepared dataset there; {fix}.") from None
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared in {searched}; expected "
        f"{builder.data_dir}; {fix}.")
  available = list(builder.info.splits)
  if split.split("[")[0] not in available:
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} in {searched} has no split {split!r}; expected one of "
        f"{available}; pass one of them.")
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def prepare(name: str, data_dir: str | None = None):
  """Downloads and prepares a tfds catalog dataset as array_record; returns its DatasetInfo.

  tfds' builders need TensorFlow (reading the result does not), so only this imports it.
  """
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    raise UserError("Preparing a tfds dataset needs TensorFlow; install it with "
                     "`pip install tensorflow-cpu`.") from None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(f"{name!r} is not in the tfds catalog; check the name at "
                               "https://www.tensorflow.org/datasets/catalog.") from None
  builder.download_and_prepare()
  return builder.info


def record_text(record: Any, field: str, where: str = "a record") -> str:
  """The UTF-8 text of a record's `field`."""
  if field not in record:
    raise UserError(f"{where} has no field {field!r}; expected one of {sorted(record)}; set "
                    "data.text_field to one of them.")
  text = record[field]
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def text_documents(source: Sequence[Any], *, field: str = "text",
                   chunk_chars: int = 2_000) -> Iterator[str]:
  """UTF-8 texts of `field`, long ones cut at paragraph, else line, boundaries; read lazily,
  one record at a time."""
  _check_chunk_chars(chunk_chars)
  for index in range(len(source)):
    yield from chunk_text(record_text(source[index], field, f"record {index}"), chunk_chars)


def _check_chunk_chars(chunk_chars: int) -> None:
  if chunk_chars < 1:
    raise UserError(f"chunk_chars={chunk_chars} is not positive; expected >= 1; pass a "
                    "positive chunk size.")


class TextChunks(collections.abc.Sequence):
  """The chunks of a random-access sequence of texts, in order, read lazily by index.

  One pass at construction counts each text's chunks; only those counts stay in memory.
  """

  def __init__(self, texts: Sequence[str], chunk_chars: int = 2_000):
    _check_chunk_chars(chunk_chars)
    self._texts, self._chunk_chars = texts, chunk_chars
    counts = np.fromiter((self._count(texts[i]) for i in range(len(texts))), np.int64,
                         len(texts))
    self._ends = np.cumsum(counts)  # Index one past each text's last chunk.
    self._chunks = functools.lru_cache(maxsize=CACHED_RECORDS)(self._read)

  def _count(self, text: str) -> int:
    if len(text) <= self._chunk_chars:
      return 1 if text else 0
    return len(chunk_text(text, self._chunk_chars))

  def _read(self, index: int) -> list[str]:
    return chunk_text(self._texts[index], self._chunk_chars)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(f"chunk {index} of {len(self)}")
    index %= len(self)
    text = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[text - 1]) if text else 0
    return self._chunks(text)[index - start]


def chunk_text(text: str, chunk_chars: int, separators: Sequence[str] = ("\n\n", "\n"),
               ) -> list[str]:
  """Cuts text into chunks of at most chunk_chars; concatenated they give back `text`.

  Chunks end at the first separator that gives pieces short enough (paragraph, then line),
  so a Shakespeare chunk is a run of whole speeches; only a single line longer than
  chunk_chars is cut mid-line.
  """
  if len(text) <= chunk_chars:
    return [text] if text else []
  if not separators:
    return [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
  pieces = [piece for part in _split_after(text, separators[0])
            for piece in chunk_text(part, chunk_chars, separators[1:])]
  return _merge_greedily(pieces, chunk_chars)


def _split_after(text: str, separator: str) -> list[str]:
  """Splits text after each separator, keeping it, so the parts join back to `text`."""
  parts = text.split(separator)
  return [part + separator for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _merge_greedily(pieces: list[str], chunk_chars: int) -> list[str]:
  """Joins consecutive pieces while the result stays within chunk_chars."""
  chunks, current = [], ""
  for piece in pieces:
    if current and len(current) + len(piece) > chunk_chars:
      chunks.append(current)
      current = ""
    current += piece
  return chunks + ([current] if current else [])


def tokenize_document(text: str, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """A pretraining document: [bos] + text + [eos], every token weighted 1.

  Chat-token literals in the text stay text (see Tokenizer.encode).
  """
  tokens_N = np.array(
      [tokenizer.bos_id, *tokenizer.encode(text, chat_tokens=False), tokenizer.eos_id],
      np.int32)
  return {"tokens": tokens_N, "weights": np.ones(tokens_N.shape, np.float32)}


class PackedDataset(grain.IterDataset):
  """Packs documents {"tokens", "weights"} into rows of seq_len (see module docstring).

  `whole=False` concatenates and splits (pretraining text); `whole=True` packs every
  document whole, best fit over a buffer of `buffer_size` pending documents (dialogue).
  """

  def __init__(self, documents: grain.IterDataset, seq_len: int,
               extra_keys: Sequence[str] = (), *, whole: bool = False,
               buffer_size: int = BEST_FIT_BUFFER):
    super().__init__(documents)
    if seq_len < 1:
      raise UserError(f"seq_len={seq_len} is not positive; expected >= 1; pass a positive "
                      "seq_len.")
    if buffer_size < 1:
      raise UserError(f"buffer_size={buffer_size} is not positive; expected >= 1; pass a "
                      "positive buffer size.")
    self._seq_len = seq_len
    self._extra_keys = tuple(extra_keys)
    self._whole = whole
    self._buffer_size = buffer_size

  def __iter__(self) -> grain.DatasetIterator:
    if self._whole:
      return BestFitIterator(iter(self._parent), self._seq_len, self._extra_keys,
                             self._buffer_size)
    return PackedIterator(iter(self._parent), self._seq_len, self._extra_keys)

  def __str__(self) -> str:
    return f"PackedDataset(seq_len={self._seq_len}, whole={self._whole})"


def _empty_row(seq_len: int, extra_keys: Sequence[str]) -> dict[str, np.ndarray]:
  dtypes = {**ROW_DTYPES, **{k: np.float32 for k in extra_keys}}
  return {name: np.zeros(seq_len, dtype) for name, dtype in dtypes.items()}


class PackedIterator(grain.DatasetIterator):
  """Concat-and-split packing; its state is (input state before document, pairs done)."""

  def __init__(self, documents: grain.DatasetIterator, seq_len: int,
               extra_keys: Sequence[str] = ()):
    super().__init__(documents)
    self._documents = documents
    self._seq_len = seq_len
    self._extra_keys = tuple(extra_keys)
    self._document = None  # The partly written document, or None between documents.
    self._document_state = None  # Input state from before `_document` was read.
    self._offset = 0  # Pairs of `_document` already written to earlier rows.

  def __next__(self) -> dict[str, np.ndarray]:
    row = _empty_row(self._seq_len, self._extra_keys)
    filled, segment_id = 0, 0
    while filled < self._seq_len:
      if self._document is None and not self._read_document():
        break
      tokens_N = self._document["tokens"]
      count = min(self._seq_len - filled, len(tokens_N) - 1 - self._offset)
      segment_id += 1
      _write_segment(row, filled, segment_id, self._document, self._offset, count)
      filled += count
      self._offset += count
      if self._offset == len(tokens_N) - 1:
        self._document = None
    if filled == 0:
      raise StopIteration
    return row

  def _read_document(self) -> bool:
    """Moves to the next document with at least one pair; False when the input ends."""
    while True:
      # Deep copy: the state must not change if the input iterator mutates its own dict.
      state = copy.deepcopy(self._documents.get_state())
      try:
        document = next(self._documents)
      except StopIteration:
        return False
      _check_document(document)
      if len(document["tokens"]) >= 2:
        self._document, self._document_state, self._offset = document, state, 0
        return True

  def get_state(self) -> dict[str, Any]:
    if self._document is None:
      return {"documents": copy.deepcopy(self._documents.get_state()), "offset": 0}
    return {"documents": copy.deepcopy(self._document_state), "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._documents.set_state(state["documents"])
    self._document = None
    offset = int(state["offset"])
    if offset == 0:
      return
    # Re-read (and re-tokenize) the document the state points into, then skip what was done.
    if not self._read_document() or offset >= len(self._document["tokens"]) - 1:
      raise UserError(
          f"packer state points {offset} pairs into a document that the input no longer "
          "has; expected the same documents, tokenizer and seq_len as when it was saved; "
          "restore with the original pipeline.")
    self._offset = offset

  def __str__(self) -> str:
    return f"PackedIterator(seq_len={self._seq_len})"


class BestFitIterator(grain.DatasetIterator):
  """Whole-document packing, best fit over a bounded buffer (see module docstring).

  Its state is the input state from before the oldest pending document, how many documents
  were read since, and which of those are still pending: re-reading them rebuilds the buffer.
  """

  def __init__(self, documents: grain.DatasetIterator, seq_len: int,
               extra_keys: Sequence[str] = (), buffer_size: int = BEST_FIT_BUFFER):
    super().__init__(documents)
    self._documents = documents
    self._seq_len = seq_len
    self._extra_keys = tuple(extra_keys)
    self._buffer_size = buffer_size
    self._reset(copy.deepcopy(documents.get_state()))

  def _reset(self, start_state) -> None:
    # (input state before reading it, its read count, document) of each pending document,
    # in read order; counts are relative to `_start_state`, the state before count 0.
    self._pending: list[tuple[Any, int, dict]] = []
    self._start_state = start_state
    self._read = 0
    self._exhausted = False

  def _fill(self) -> None:
    """Reads documents until the buffer is full or the input ends."""
    while len(self._pending) < self._buffer_size and not self._exhausted:
      state = copy.deepcopy(self._documents.get_state())
      try:
        document = next(self._documents)
      except StopIteration:
        self._exhausted = True
        return
      self._read += 1
      _check_document(document)
      pairs = len(document["tokens"]) - 1
      if pairs > self._seq_len:
        raise UserError(
            f"{document.get('source', 'a document')} is {pairs + 1} tokens long, more than "
            f"a row of seq_len={self._seq_len} holds ({self._seq_len + 1} tokens); expected "
            "every conversation (or window) to fit a row whole; raise data.seq_len, use "
            "dialogue.long_conversations, or shorten that conversation.")
      if pairs >= 1:
        self._pending.append((state, self._read - 1, document))

  def _take(self, index: int) -> dict:
    """Removes pending document `index`, re-basing the state on the oldest one left."""
    _, _, document = self._pending.pop(index)
    if not self._pending:
      self._start_state, self._read = copy.deepcopy(self._documents.get_state()), 0
    elif index == 0:
      state, first, _ = self._pending[0]
      self._pending = [(s, k - first, d) for s, k, d in self._pending]
      self._start_state, self._read = state, self._read - first
    return document

  def __next__(self) -> dict[str, np.ndarray]:
    self._fill()
    if not self._pending:
      raise StopIteration
    row = _empty_row(self._seq_len, self._extra_keys)
    filled, segment_id, index = 0, 0, 0  # The oldest pending document opens every row.
    while index is not None:
      document = self._take(index)
      count = len(document["tokens"]) - 1
      segment_id += 1
      _write_segment(row, filled, segment_id, document, 0, count)
      filled += count
      self._fill()
      index = _best_fit(self._pending, self._seq_len - filled)
    return row

  def get_state(self) -> dict[str, Any]:
    return {"documents": copy.deepcopy(self._start_state), "read": self._read,
            "pending": [k for _, k, _ in self._pending]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._documents.set_state(state["documents"])
    self._reset(copy.deepcopy(state["documents"]))
    pending = {int(k) for k in state["pending"]}
    for k in range(int(state["read"])):
      before = copy.deepcopy(self._documents.get_state())
      try:
        document = next(self._documents)
      except StopIteration:
        raise UserError(
            f"packer state needs {state['read']} documents after its saved position but the "
            "input has fewer; expected the same documents, tokenizer and seq_len as when it "
            "was saved; restore with the original pipeline.") from None
      if k in pending:
        self._pending.append((before, k, document))
    self._read = int(state["read"])

  def __str__(self) -> str:
    return f"BestFitIterator(seq_len={self._seq_len}, buffer_size={self._buffer_size})"


def _best_fit(pending: Sequence[tuple[Any, int, dict]], space: int) -> int | None:
  """Index of the longest pending document that fits `space` pairs (earliest on ties)."""
  best, best_pairs = None, 0
  for i, (_, _, document) in enumerate(pending):
    pairs = len(document["tokens"]) - 1
    if best_pairs < pairs <= space:
      best, best_pairs = i, pairs
  return best


def _check_document(document: Any) -> None:
  """Raises unless the document is {"tokens": [N] ints, "weights": [N]}."""
  if (not isinstance(document, dict) or "tokens" not in document or "weights" not in document
      or np.shape(document["tokens"]) != np.shape(document["weights"])
      or np.ndim(document["tokens"]) != 1):
    raise ValueError(
        "packing got a document that is not {'tokens': [N], 'weights': [N]}; expected two 1-D "
        "arrays of equal length; map documents with tokenize_document (or an equivalent).")


def _write_segment(row: dict[str, np.ndarray], start: int, segment_id: int,
                   document: dict[str, np.ndarray], offset: int, count: int) -> None:
  """Writes pairs [offset, offset + count) of a document at row[start:] as one segment."""
  end = start + count
  tokens_N = document["tokens"]
  row["inputs"][start:end] = tokens_N[offset:offset + count]
  row["targets"][start:end] = tokens_N[offset + 1:offset + count + 1]
  row["segment_ids"][start:end] = segment_id
  row["positions"][start:end] = np.arange(count)
  for name in row:
    if name in document and name != "tokens":  # weights and extra keys: target-aligned.
      row[name][start:end] = document[name][offset + 1:offset + count + 1]


def batch_rows(rows: grain.IterDataset, *, batch_size: int) -> grain.IterDataset:
  """Stacks rows into [batch_size, seq_len] batches; a short last batch gets padding rows."""
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} is not positive; expected >= 1; pass a "
                    "positive batch_size.")
  return rows.batch(batch_size, batch_fn=functools.partial(_stack_padded,
                                                           batch_size=batch_size))


def _stack_padded(rows: Sequence[dict[str, np.ndarray]], batch_size: int,
                  ) -> dict[str, np.ndarray]:
  """Stacks rows, appending all-zero (weight 0) rows up to batch_size: shapes stay static."""
  missing = batch_size - len(rows)
  return {name: np.concatenate([np.stack([row[name] for row in rows]),
                                np.zeros((missing, len(rows[0][name])), rows[0][name].dtype)])
          for name in rows[0]}


def make_pretrain_dataset(documents: Sequence[str], tokenizer: Tokenizer, *, seq_len: int,
                          batch_size: int, seed: int, shard_index: int = 0,
                          shard_count: int = 1, shuffle: bool = True,
                          num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of packed pretraining rows; iter() of it is a checkpointable grain iterator.

  This process reads documents[shard_index::shard_count]. Shuffling happens per epoch
  (grain folds the epoch into the seed); num_epochs=None repeats forever.
  """
  return make_dataset(documents, functools.partial(tokenize_document, tokenizer=tokenizer),
                      seq_len=seq_len, batch_size=batch_size, seed=seed,
                      shard_index=shard_index, shard_count=shard_count, shuffle=shuffle,
                      num_epochs=num_epochs)


def make_dataset(items: Sequence[Any], to_document, *, seq_len: int, batch_size: int,
                 seed: int, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None, extra_keys: Sequence[str] = (),
                 whole: bool = False) -> grain.IterDataset:
  """Batches of packed rows from `items`, each mapped by `to_document` to {"tokens", ...}.

  The one pipeline of every stage: shard by process, shuffle per epoch, map, pack, batch.
  `items` is read by index, lazily (a TextChunks or a tfds source is never copied); `whole`
  packs documents whole (best fit) instead of concat-and-split.
  """
  _check_pipeline_args(len(items), shard_index, shard_count, num_epochs)
  ds = grain.MapDataset.source(items)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)  # An index permutation (grain's index_shuffle): no copy.
  ds = ds.repeat(num_epochs)
  ds = ds.map(to_document)
  rows = PackedDataset(ds.to_iter_dataset(_SYNCHRONOUS), seq_len, extra_keys, whole=whole)
  return batch_rows(rows, batch_size=batch_size)


def packing_efficiency(batches) -> float:
  """Real tokens / row capacity of `batches` (positions with a segment id over all)."""
  real = capacity = 0
  for batch in batches:
    real += int(np.count_nonzero(batch["segment_ids"]))
    capacity += batch["segment_ids"].size
  return real / capacity if capacity else 0.0


def _check_pipeline_args(num_documents: int, shard_index: int, shard_count: int,
                         num_epochs: int | None) -> None:
  """Raises a one-line error for arguments that would give an empty or wrong pipeline."""
  if not 0 <= shard_index < shard_count:
    raise UserError(f"shard_index={shard_index} is outside shard_count={shard_count}; "
                    "expected 0 <= shard_index < shard_count; pass the process index and "
                    "process count.")
  if num_documents < shard_count:
    raise UserError(f"{num_documents} documents cannot feed {shard_count} shards; expected "
                    "at least one document per shard; use a smaller chunk_chars or fewer "
                    "processes.")
  if num_epochs is not None and num_epochs < 1:
    raise UserError(f"num_epochs={num_epochs} is not positive; expected >= 1 or None "
                    "(repeat forever); pass one of them.")
