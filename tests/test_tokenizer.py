"""Tokenizer: reserved ids, exact round trip, deterministic training, persistence."""

import pickle

import pytest

from gptjax import tokenizer as tok

_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.
"""
_TEXTS = [_TEXT * 3, "<|user|> hello there\n<|assistant|> well met, good sir<|end|>\n"]
_VOCAB_SIZE = 330


@pytest.fixture(scope="module")
def tokenizer():
  return tok.train_tokenizer(_TEXTS, vocab_size=_VOCAB_SIZE)


def test_reserved_ids_are_fixed(tokenizer):
  pieces = [tokenizer.id_to_piece(i) for i in range(9)]
  assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>",
                    "<|assistant|>", "<|end|>", "\n"]
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  assert (tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id,
          tokenizer.end_id) == (4, 5, 6, 7)
  assert tokenizer.id_to_piece(9) == "<0x00>"
  assert tokenizer.vocab_size == _VOCAB_SIZE


@pytest.mark.parametrize("text", [
    "Speak, speak.",
    " leading and trailing spaces ",
    "two  spaces\tand a tab\n\nand blank lines\n",
    "\n",
    "emoji 😀🎭 and CJK 漢字かな, combining e\u0301 and Ω",
    "   ",
    "",
    "literal \u2581 meta-space \u2581\u2581 characters",
    "text with <s> and </s> in it",
])
def test_round_trip_is_exact(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unseen_characters_use_bytes_not_unk(tokenizer):
  ids = tokenizer.encode("漢")
  assert tok.UNK_ID not in ids
  assert [tokenizer.id_to_piece(i) for i in ids] == ["<0xE6>", "<0xBC>", "<0xA2>"]


def test_newline_is_one_piece(tokenizer):
  assert tokenizer.encode("\n") == [tokenizer.newline_id]


def test_chat_tokens_encode_and_decode_as_their_strings(tokenizer):
  ids = tokenizer.encode("<|user|>hi<|end|>")
  assert ids[0] == tokenizer.user_id and ids[-1] == tokenizer.end_id
  assert tokenizer.decode([tokenizer.system_id, tokenizer.assistant_id]) == (
      "<|system|><|assistant|>")


@pytest.mark.parametrize("text", ["<|user|>hi<|end|>", "a<|end|>b", "<|<|end|>|>", "<|end",
                                  "x <|system|><|assistant|> \u2581y"])
def test_chat_tokens_can_stay_text(tokenizer, text):
  ids = tokenizer.encode(text, chat_tokens=False)
  reserved = {tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id}
  assert not reserved & set(ids)
  assert tokenizer.decode(ids) == text


def test_decode_drops_pad_and_shows_bos_eos(tokenizer):
  ids = [tokenizer.bos_id] + tokenizer.encode("hear me") + [tokenizer.eos_id, 0, 0]
  assert tokenizer.decode(ids) == "<s>hear me</s>"


def test_decode_rejects_out_of_range_ids(tokenizer):
  with pytest.raises(ValueError, match="out of range"):
    tokenizer.decode([tokenizer.vocab_size])


def test_training_is_deterministic(tokenizer):
  again = tok.train_tokenizer(_TEXTS, vocab_size=_VOCAB_SIZE)
  assert again.model_bytes == tokenizer.model_bytes


def test_unigram_model_round_trips():
  unigram = tok.train_tokenizer(_TEXTS, vocab_size=300, model_type="unigram")
  assert unigram.id_to_piece(7) == "<|end|>"
  assert unigram.decode(unigram.encode(" Caius  😀\n")) == " Caius  😀\n"


def test_training_lines_are_capped_and_short_enough_for_sentencepiece():
  assert tok._training_lines(["abc\ndefgh\n\nij"], max_chars=6) == ["abc", "def"]
  # SentencePiece would silently skip a line over 4192 bytes.
  assert [len(x) for x in tok._training_lines(["é" * 2500], max_chars=10**6)] == [1000, 1000, 500]


def test_save_load_and_pickle_round_trip(tokenizer, tmp_path):
  path = tmp_path / "tok.model"
  tokenizer.save(path)
  assert tok.Tokenizer.load(path).model_bytes == tokenizer.model_bytes
  assert list(tmp_path.iterdir()) == [path]  # The temp file was renamed, not left behind.
  clone = pickle.loads(pickle.dumps(tokenizer))
  assert clone.encode(_TEXT) == tokenizer.encode(_TEXT)


def test_vocab_below_reserved_and_bytes_is_rejected():
  with pytest.raises(ValueError, match=f"at least {tok.MIN_VOCAB_SIZE}"):
    tok.train_tokenizer(_TEXTS, vocab_size=tok.MIN_VOCAB_SIZE - 1)


def test_vocab_too_small_for_the_characters_names_the_minimum():
  with pytest.raises(ValueError, match=r"too small for this text; expected at least \d+"):
    tok.train_tokenizer(_TEXTS, vocab_size=tok.MIN_VOCAB_SIZE)


def test_vocab_too_large_for_the_text_names_the_maximum():
  with pytest.raises(ValueError, match=r"expected at most \d+"):
    tok.train_tokenizer(["tiny text"], vocab_size=5000)


def test_foreign_model_is_rejected(tokenizer):
  import io
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_TEXT.split("\n") * 2),
                                 model_writer=model, vocab_size=60, minloglevel=2)
  with pytest.raises(ValueError, match="retrain it"):
    tok.Tokenizer.from_bytes(model.getvalue())
