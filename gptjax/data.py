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

Packing. A document is a token sequence with one loss weight per token ([bos] + text +
[eos] with weights 1 for pretraining; the dialogue stage brings its own weights). It yields
the pairs (tokens[:-1] -> tokens[1:]) with weights[1:]. Pairs are written greedily, in
order, into rows of seq_len; a document longer than the space left in a row fills the row
and continues at the start of the next row as a new segment. Invariants:

  * no attention across documents: each document piece has its own segment id in its row;
  * positions restart at 0 at every segment start (also for a continued document);
  * every target of every document appears exactly once per pass over the documents;
  * padding exists only in the last row of a finite pass (and in rows added to fill its last
    batch), and all padding has weight 0 and segment id 0.

The packer's checkpoint state is the grain state of its input from before the current
document plus the number of pairs of it already written: small, JSON-serialisable, and
restoring it yields exactly the rows an uninterrupted iterator would.
"""

import copy
import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

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


class DatasetNotFoundError(ValueError):
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
    raise ValueError("Preparing a tfds dataset needs TensorFlow; install it with "
                     "`pip install tensorflow-cpu`.") from None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(f"{name!r} is not in the tfds catalog; check the name at "
                               "https://www.tensorflow.org/datasets/catalog.") from None
  builder.download_and_prepare()
  return builder.info


def text_documents(source: Sequence[Any], *, field: str = "text",
                   chunk_chars: int = 2_000) -> list[str]:
  """UTF-8 texts of `field`, long ones cut at paragraph, else line, boundaries."""
  if chunk_chars < 1:
    raise ValueError(f"chunk_chars={chunk_chars} is not positive; expected >= 1; pass a "
                     "positive chunk size.")
  documents = []
  for index in range(len(source)):
    record = source[index]
    if field not in record:
      raise KeyError(f"record {index} has no field {field!r}; expected one of "
                     f"{sorted(record)}; pass field=<one of them>.")
    text = record[field]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    documents += chunk_text(text, chunk_chars)
  return documents


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
  """Packs documents {"tokens", "weights"} into rows of seq_len (see module docstring)."""

  def __init__(self, documents: grain.IterDataset, seq_len: int,
               extra_keys: Sequence[str] = ()):
    super().__init__(documents)
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} is not positive; expected >= 1; pass a positive "
                       "seq_len.")
    self._seq_len = seq_len
    self._extra_keys = tuple(extra_keys)

  def __iter__(self) -> "PackedIterator":
    return PackedIterator(iter(self._parent), self._seq_len, self._extra_keys)

  def __str__(self) -> str:
    return f"PackedDataset(seq_len={self._seq_len})"


class PackedIterator(grain.DatasetIterator):
  """Iterator of PackedDataset; its state is (input state before document, pairs done)."""

  def __init__(self, documents: grain.DatasetIterator, seq_len: int,
               extra_keys: Sequence[str] = ()):
    super().__init__(documents)
    self._documents = documents
    self._seq_len = seq_len
    self._row_dtypes = {**ROW_DTYPES, **{k: np.float32 for k in extra_keys}}
    self._document = None  # The partly written document, or None between documents.
    self._document_state = None  # Input state from before `_document` was read.
    self._offset = 0  # Pairs of `_document` already written to earlier rows.

  def __next__(self) -> dict[str, np.ndarray]:
    row = {name: np.zeros(self._seq_len, dtype) for name, dtype in self._row_dtypes.items()}
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
      raise ValueError(
          f"packer state points {offset} pairs into a document that the input no longer "
          "has; expected the same documents, tokenizer and seq_len as when it was saved; "
          "restore with the original pipeline.")
    self._offset = offset

  def __str__(self) -> str:
    return f"PackedIterator(seq_len={self._seq_len})"


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
    raise ValueError(f"batch_size={batch_size} is not positive; expected >= 1; pass a "
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
                 num_epochs: int | None = None,
                 extra_keys: Sequence[str] = ()) -> grain.IterDataset:
  """Batches of packed rows from `items`, each mapped by `to_document` to {"tokens", ...}.

  The one pipeline of every stage: shard by process, shuffle per epoch, map, pack, batch.
  """
  _check_pipeline_args(len(items), shard_index, shard_count, num_epochs)
  ds = grain.MapDataset.source(items)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(to_document)
  rows = PackedDataset(ds.to_iter_dataset(_SYNCHRONOUS), seq_len, extra_keys)
  return batch_rows(rows, batch_size=batch_size)


def _check_pipeline_args(num_documents: int, shard_index: int, shard_count: int,
                         num_epochs: int | None) -> None:
  """Raises a one-line error for arguments that would give an empty or wrong pipeline."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is outside shard_count={shard_count}; "
                     "expected 0 <= shard_index < shard_count; pass the process index and "
                     "process count.")
  if num_documents < shard_count:
    raise ValueError(f"{num_documents} documents cannot feed {shard_count} shards; expected "
                     "at least one document per shard; use a smaller chunk_chars or fewer "
                     "processes.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} is not positive; expected >= 1 or None "
                     "(repeat forever); pass one of them.")
