"""Data pipeline: chunking, packing invariants, determinism, sharding, checkpointed state."""

import json
import os

import grain
import numpy as np
import pytest

from gptjax import data
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

_BOS, _EOS = 2, 3


class _CharTokenizer:
  """One token per character (its code point): enough to test the pipeline without training."""

  bos_id, eos_id = _BOS, _EOS

  def encode(self, text, chat_tokens=True):
    del chat_tokens  # No chat tokens here.
    return [ord(c) for c in text]


def _documents(lengths):
  """Token 1000 * d + i is token i of document d; weights alternate 1, 2 (as dialogue might)."""
  return [{"tokens": np.arange(n, dtype=np.int32) + 1000 * d,
           "weights": (1 + np.arange(n) % 2).astype(np.float32)}
          for d, n in enumerate(lengths)]


def _pack(documents, seq_len):
  source = grain.MapDataset.source(documents).to_iter_dataset()
  return list(data.PackedDataset(source, seq_len))


def _text_docs(count):
  """Documents "A", "BB", "CCC", ...: the character identifies the document."""
  return [chr(ord("A") + d) * (d % 5 + 1) for d in range(count)]


def _doc_order(batches):
  """Characters of the documents in the order their first token appears."""
  order = []
  for batch in batches:
    starts = (batch["positions"] == 0) & (batch["inputs"] == _BOS)
    order += [chr(c) for c in batch["targets"][starts]]
  return order


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for e, a in zip(expected, actual):
    assert e.keys() == a.keys()
    for name in e:
      np.testing.assert_array_equal(e[name], a[name], err_msg=name)


def test_rows_follow_the_documented_layout():
  rows = _pack(_documents([5, 3, 9]), seq_len=6)
  np.testing.assert_array_equal(rows[0]["inputs"], [0, 1, 2, 3, 1000, 1001])
  np.testing.assert_array_equal(rows[0]["targets"], [1, 2, 3, 4, 1001, 1002])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 3, 0, 1])
  # Document 2 has 8 pairs: 6 fill row 1, the last 2 start row 2 as a new segment at 0.
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1] * 6)
  np.testing.assert_array_equal(rows[2]["inputs"], [2006, 2007, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[2]["positions"], [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[2]["segment_ids"], [1, 1, 0, 0, 0, 0])
  assert {name: row.dtype for name, row in rows[0].items()} == data.ROW_DTYPES


def test_packing_invariants_on_random_documents():
  rng = np.random.default_rng(0)
  documents = _documents(rng.integers(1, 30, size=40))
  rows = _pack(documents, seq_len=16)
  pairs = set()
  for r, row in enumerate(rows):
    padding = row["segment_ids"] == 0
    assert not row["weights"][padding].any()
    assert not padding.any() or r == len(rows) - 1  # Only the last row is padded.
    for segment in np.unique(row["segment_ids"][~padding]):
      at = row["segment_ids"] == segment
      assert len(np.unique(row["inputs"][at] // 1000)) == 1  # One document per segment.
      np.testing.assert_array_equal(row["positions"][at], np.arange(at.sum()))
      np.testing.assert_array_equal(row["targets"][at], row["inputs"][at] + 1)
    for i in np.flatnonzero(~padding):
      pair = (int(row["inputs"][i]), int(row["targets"][i]), float(row["weights"][i]))
      assert pair not in pairs
      pairs.add(pair)
  expected = {(int(d["tokens"][i]), int(d["tokens"][i + 1]), float(d["weights"][i + 1]))
              for d in documents for i in range(len(d["tokens"]) - 1)}
  assert pairs == expected  # Every target once, carrying the weight of the target token.


def test_pretraining_text_keeps_chat_token_literals_as_text():
  tokenizer = tokenizer_lib.train_tokenizer(["the end of it, and of the end " * 20],
                                            vocab_size=280)
  tokens = data.tokenize_document("the end<|end|> of it", tokenizer)["tokens"]
  assert tokenizer.end_id not in tokens.tolist()
  assert tokenizer.decode(tokens) == "<s>the end<|end|> of it</s>"


def test_single_token_documents_are_skipped():
  rows = _pack(_documents([1, 3, 1]), seq_len=4)
  assert len(rows) == 1
  np.testing.assert_array_equal(rows[0]["inputs"], [1000, 1001, 0, 0])


def test_packer_state_restores_mid_document():
  documents = _documents([7, 11, 3, 13, 5])
  source = grain.MapDataset.source(documents).to_iter_dataset()
  packed = data.PackedDataset(source, 4)
  it = iter(packed)
  next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["offset"] > 0  # The state points inside a document.
  restored = iter(packed)
  restored.set_state(state)
  _assert_batches_equal(list(it), list(restored))


def test_pipeline_state_restores_mid_document_across_epochs():
  ds = data.make_pretrain_dataset(_text_docs(9), _CharTokenizer(), seq_len=5, batch_size=2,
                                  seed=3)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["offset"] > 0
  expected = [next(it) for _ in range(10)]
  restored = iter(ds)
  restored.set_state(state)
  _assert_batches_equal(expected, [next(restored) for _ in range(10)])


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = data.make_pretrain_dataset(_text_docs(9), _CharTokenizer(), seq_len=5, batch_size=2,
                                  seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    restored = iter(ds)
    manager.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
  _assert_batches_equal(expected, [next(restored) for _ in range(3)])


def test_same_seed_same_batches_other_seed_differs():
  def first_batches(seed):
    ds = data.make_pretrain_dataset(_text_docs(20), _CharTokenizer(), seq_len=8,
                                    batch_size=2, seed=seed)
    it = iter(ds)
    return [next(it) for _ in range(4)]

  _assert_batches_equal(first_batches(1), first_batches(1))
  assert not np.array_equal(first_batches(1)[0]["inputs"], first_batches(2)[0]["inputs"])


def test_each_epoch_is_reshuffled_and_complete():
  documents = _text_docs(12)
  ds = data.make_pretrain_dataset(documents, _CharTokenizer(), seq_len=64, batch_size=1,
                                  seed=0, num_epochs=2)
  order = _doc_order(list(ds))
  first, second = order[:12], order[12:]
  assert sorted(first) == sorted(second) == sorted(d[0] for d in documents)
  assert first != second


def test_eval_pass_keeps_order_and_pads_last_batch():
  documents = _text_docs(7)
  ds = data.make_pretrain_dataset(documents, _CharTokenizer(), seq_len=6, batch_size=4,
                                  seed=0, shuffle=False, num_epochs=1)
  batches = list(ds)
  assert all(b["inputs"].shape == (4, 6) for b in batches)
  assert _doc_order(batches) == [d[0] for d in documents]
  # Each document contributes len + 1 targets ([bos] + text + [eos] has len + 2 tokens).
  assert sum(b["weights"].sum() for b in batches) == sum(len(d) + 1 for d in documents)
  last = batches[-1]
  empty_rows = ~last["segment_ids"].any(axis=1)
  assert empty_rows.any() and not last["weights"][empty_rows].any()


def test_shards_read_disjoint_documents():
  documents = _text_docs(10)
  shards = [_doc_order(data.make_pretrain_dataset(
      documents, _CharTokenizer(), seq_len=8, batch_size=2, seed=0, shard_index=i,
      shard_count=3, num_epochs=1)) for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(d[0] for d in documents)
  assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])


def test_bad_shard_index_is_rejected():
  with pytest.raises(ValueError, match="shard_index=3 is outside shard_count=3"):
    data.make_pretrain_dataset(_text_docs(4), _CharTokenizer(), seq_len=8, batch_size=2,
                               seed=0, shard_index=3, shard_count=3)


def test_chunk_text_cuts_at_paragraphs_then_lines():
  speeches = ["ALL:\nSpeak, speak.\n", "FIRST:\nYou are resolved?\nRather to die?\n",
              "ALL:\nResolved.\n"]
  text = "\n".join(speeches)
  chunks = data.chunk_text(text, chunk_chars=45)
  assert "".join(chunks) == text
  assert chunks == ["ALL:\nSpeak, speak.\n\n", "FIRST:\nYou are resolved?\nRather to die?\n\n",
                    "ALL:\nResolved.\n"]
  by_line = data.chunk_text(speeches[1], chunk_chars=20)
  assert by_line == ["FIRST:\n", "You are resolved?\n", "Rather to die?\n"]
  assert data.chunk_text("x" * 5, chunk_chars=2) == ["xx", "xx", "x"]


def test_text_documents_decodes_and_chunks_records():
  source = [{"text": "a\n\nb".encode()}, {"text": "día".encode()}]
  assert list(data.text_documents(source, chunk_chars=3)) == ["a\n\n", "b", "día"]
  with pytest.raises(UserError, match="no field 'body'"):
    list(data.text_documents(source, field="body"))


def test_missing_dataset_error_says_where_and_how_to_fix(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.load_source("tiny_shakespeare", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  for part in ("tiny_shakespeare", "'train'", str(tmp_path),
               "python -m gptjax prepare --dataset tiny_shakespeare"):
    assert part in message
  with pytest.raises(data.DatasetNotFoundError, match="'no_such_dataset'"):
    data.load_source("no_such_dataset", "train", data_dir=str(tmp_path))


@pytest.fixture
def tfds_data_dir():
  if "TFDS_DATA_DIR" not in os.environ:
    pytest.skip("TFDS_DATA_DIR is unset; point it at the prepared tfds datasets to run this.")
  return os.environ["TFDS_DATA_DIR"]


def test_unknown_split_lists_available_ones(tfds_data_dir):
  with pytest.raises(data.DatasetNotFoundError, match=r"expected one of \['train'"):
    data.load_source("tiny_shakespeare", "bogus", data_dir=tfds_data_dir)


def test_tiny_shakespeare_gives_batches(tfds_data_dir):
  from gptjax.tokenizer import train_tokenizer
  documents = list(data.text_documents(data.load_source("tiny_shakespeare", "validation")))
  assert all(len(d) <= 2_000 for d in documents) and len(documents) > 10
  tokenizer = train_tokenizer(documents[:5], vocab_size=400)
  batch = next(iter(data.make_pretrain_dataset(documents, tokenizer, seq_len=32,
                                               batch_size=2, seed=0)))
  assert batch["inputs"].shape == (2, 32) and batch["weights"].all()
  assert tokenizer.decode(batch["inputs"][0]).startswith("<s>")


TINY_BUILDER = '''
import tensorflow_datasets as tfds


class GptjaxTinyLines(tfds.core.GeneratorBasedBuilder):
  """Three lines of text, generated locally (no download)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, line in enumerate(["First line.", "Second line.", "Third, last."]):
      yield i, {"text": line}
'''


def test_prepare_builds_array_record_that_load_source_reads(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow", reason="preparing tfds datasets needs tensorflow-cpu")
  # tfds registers a builder when its class is defined; it must live in a package.
  package = tmp_path / "gptjax_tiny_builder"
  package.mkdir()
  (package / "__init__.py").write_text(TINY_BUILDER)
  monkeypatch.syspath_prepend(str(tmp_path))
  import gptjax_tiny_builder  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  data_dir = tmp_path / "tfds"
  info = data.prepare("gptjax_tiny_lines", str(data_dir))
  assert info.splits["train"].num_examples == 3
  assert list((data_dir / "gptjax_tiny_lines" / "1.0.0").glob("*.array_record*"))
  source = data.load_source("gptjax_tiny_lines", "train", str(data_dir))
  assert sorted(source[i]["text"] for i in range(3)) == [b"First line.", b"Second line.",
                                                          b"Third, last."]


def test_prepare_names_an_unknown_dataset(tmp_path):
  pytest.importorskip("tensorflow", reason="preparing tfds datasets needs tensorflow-cpu")
  with pytest.raises(data.DatasetNotFoundError, match="not in the tfds catalog"):
    data.prepare("no_such_dataset_anywhere", str(tmp_path))


def _whole_rows(lengths, seq_len, **kwargs):
  ds = data.make_dataset(_documents(lengths), lambda d: d, seq_len=seq_len, batch_size=1,
                         seed=0, num_epochs=1, whole=True, **kwargs)
  return [{k: v[0] for k, v in batch.items()} for batch in ds]


def _segments(rows):
  """(row index, first token, inputs) of every segment of every row."""
  out = []
  for r, row in enumerate(rows):
    for s in range(1, row["segment_ids"].max() + 1):
      mask = row["segment_ids"] == s
      np.testing.assert_array_equal(row["positions"][mask], np.arange(mask.sum()))
      out.append((r, row["inputs"][mask][0], row["inputs"][mask]))
  return out


def test_twenty_conversations_of_200_tokens_at_256_are_all_whole():
  rows = _whole_rows([200] * 20, seq_len=256)
  segments = _segments(rows)
  assert len(rows) == 20 and len(segments) == 20  # One whole document a row, none split.
  for _, first, inputs in segments:
    np.testing.assert_array_equal(inputs, np.arange(199) + first)
    assert first % 1000 == 0  # Each segment starts at its document's first token.


def test_best_fit_packs_mixed_lengths_whole_and_densely():
  lengths = np.random.default_rng(0).integers(10, 250, size=300).tolist()
  rows = _whole_rows(lengths, seq_len=256)
  segments = _segments(rows)
  # Every document once, whole (its first token opens the segment, all its pairs follow).
  assert sorted(int(first) // 1000 for _, first, _ in segments) == list(range(len(lengths)))
  for _, first, inputs in segments:
    assert len(inputs) == lengths[int(first) // 1000] - 1
  # Writing them in order, a new row whenever one does not fit, fills 73% of the rows (216
  # rows); best fit needs 167, 158 at the very least (the pass's last rows drain the buffer).
  assert data.packing_efficiency(rows) > 0.94


def test_best_fit_rows_are_deterministic_and_follow_the_input_order():
  lengths = np.random.default_rng(1).integers(3, 60, size=80).tolist()
  _assert_batches_equal(_whole_rows(lengths, 64), _whole_rows(lengths, 64))
  # The oldest pending document opens each row: a document waits at most buffer_size rows.
  rows = _whole_rows(lengths, 64, shuffle=False)
  openers = [int(row["inputs"][0]) // 1000 for row in rows]
  assert openers == sorted(openers)


def test_a_document_longer_than_a_row_is_an_error_naming_it():
  documents = _documents([5, 12, 5])
  documents[1]["source"] = "chats.jsonl:2"
  ds = data.make_dataset(documents, lambda d: d, seq_len=8, batch_size=1, seed=0,
                         shuffle=False, num_epochs=1, whole=True)
  with pytest.raises(UserError, match=r"chats.jsonl:2 is 12 tokens long, more than a row"):
    list(ds)


def test_best_fit_state_restores_mid_epoch_across_epochs():
  lengths = np.random.default_rng(2).integers(3, 30, size=25).tolist()
  ds = data.make_dataset(_documents(lengths), lambda d: d, seq_len=32, batch_size=2, seed=5,
                         whole=True)
  it = iter(ds)
  for _ in range(9):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(12)]
  restored = iter(ds)
  restored.set_state(state)
  _assert_batches_equal(expected, [next(restored) for _ in range(12)])


def test_pretraining_text_still_concatenates_and_splits():
  ds = data.make_pretrain_dataset(["x" * 30, "y" * 30], _CharTokenizer(), seq_len=8,
                                  batch_size=1, seed=0, shuffle=False, num_epochs=1)
  rows = [batch for batch in ds]
  assert all(row["segment_ids"].all() for row in rows[:-1])  # Full rows, no padding.
  # A document continues at the start of the next row, as a new segment at position 0.
  assert rows[1]["inputs"][0, 0] == ord("x") and rows[1]["positions"][0, 0] == 0
  assert data.packing_efficiency(rows) > 0.9


def test_text_chunks_read_records_lazily_by_index():
  class Records:
    reads = 0

    def __len__(self):
      return 3

    def __getitem__(self, index):
      Records.reads += 1
      return ["a\n\nb", "", "día\ncd\n"][index]

  chunks = data.TextChunks(Records(), chunk_chars=3)
  assert list(chunks) == ["a\n\n", "b", "día", "\n", "cd\n"]
  assert len(chunks) == 5 and chunks[3] == "\n" and chunks[-1] == "cd\n"
  before = Records.reads
  assert chunks[4] == "cd\n" and Records.reads == before  # Cached: no re-read.
