"""SentencePiece tokenizer whose reserved ids are the same in every trained model.

Pretraining trains the tokenizer once and the dialogue stage reuses it, so the chat tokens
are reserved from the start:

  0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)
  4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>   8 "\\n"
  9..264 the 256 byte pieces <0x00>..<0xFF>, then the learned pieces.

A workdir's tokenizer is of one of two kinds behind the same interface: this module's
SentencePiece model, trained here, or an imported model's own `tokenizers`-library tokenizer
(gptjax/hf/tokenizer.py), whose special-token ids come from the tokenizer itself. Code that
needs the ids reads them from the tokenizer object (`tokenizer.eos_id`), never these constants;
`Tokenizer.load` and `Tokenizer.from_bytes` return whichever kind the bytes hold.

Byte fallback, identity normalization, no whitespace collapsing, no dummy prefix and
escaping the literal "\u2581" (SentencePiece's space marker) to its bytes make
`decode(encode(s)) == s` for every valid Unicode string, never producing <unk>.
"""

import io
import os
import re
import tempfile
from collections.abc import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = 4, 5, 6, 7
NEWLINE_ID = 8
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_CHAT_TOKEN_PATTERN = re.compile("|".join(map(re.escape, CHAT_TOKENS)))
# "\n" as its own piece: readable in `id_to_piece` and independent of byte fallback. Pieces
# never cross it because the trainer sees one line at a time.
NEWLINE = "\n"
RESERVED_PIECES = ("<pad>", "<unk>", "<s>", "</s>", *CHAT_TOKENS, NEWLINE)
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = len(RESERVED_PIECES) + NUM_BYTE_PIECES
MODEL_TYPES = ("bpe", "unigram")
# SentencePiece writes spaces as this character, so a literal one in text needs escaping.
_META_SPACE = "\u2581"
# SentencePiece skips training lines over 4192 bytes; 1000 characters are at most 4000.
_MAX_LINE_CHARS = 1000


class Tokenizer:
  """Text <-> token ids with the fixed reserved ids above; pickles as its model bytes."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  system_id = SYSTEM_ID
  user_id = USER_ID
  assistant_id = ASSISTANT_ID
  end_id = END_ID
  newline_id = NEWLINE_ID

  def __init__(self, model_bytes: bytes):
    self._model_bytes = bytes(model_bytes)
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
    _check_layout(self._sp)

  @classmethod
  def from_bytes(cls, model_bytes: bytes) -> "Tokenizer":
    """Loads a serialized SentencePiece model, checking the reserved-id layout; or, for the
    JSON of an imported model's tokenizer, a gptjax.hf.tokenizer.TokenizersTokenizer."""
    if bytes(model_bytes[:1]) == b"{":
      from gptjax.hf import tokenizer as hf_tokenizer  # pylint: disable=g-import-not-at-top
      return hf_tokenizer.TokenizersTokenizer(model_bytes)
    return cls(model_bytes)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Reads a model written by `save`."""
    with open(path, "rb") as f:
      return cls.from_bytes(f.read())

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model atomically, so a crash never leaves a truncated file at `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(self._model_bytes)
      os.replace(tmp_path, path)
    except BaseException:
      os.unlink(tmp_path)
      raise

  @property
  def model_bytes(self) -> bytes:
    """The serialized model proto; equal bytes mean identical tokenizers."""
    return self._model_bytes

  @property
  def vocab_size(self) -> int:
    """Number of ids, reserved ones included."""
    return self._sp.vocab_size()

  def encode(self, text: str, *, chat_tokens: bool = True) -> list[int]:
    """Token ids of plain text, without bos/eos.

    A literal "<|user|>" etc. inside `text` becomes the chat-token id (SentencePiece matches
    user-defined symbols in raw text); "<s>" / "</s>" stay ordinary text. With
    `chat_tokens=False` those literals stay text too (other pieces spell them), so text from
    users or data can never end a turn or open one: `decode` still gives `text` back.
    """
    if chat_tokens:
      return self._encode_text(text)
    ids, start = [], 0
    for match in _CHAT_TOKEN_PATTERN.finditer(text):
      literal = match.group()
      # Apart, "<" and "|end|>" match no chat token (they all begin with "<|").
      ids += (self._encode_text(text[start:match.start()]) + self._encode_text(literal[0])
              + self._encode_text(literal[1:]))
      start = match.end()
    return ids + self._encode_text(text[start:])

  def _encode_text(self, text: str) -> list[int]:
    if _META_SPACE not in text:
      return self._sp.encode(text)
    # A literal "▁" would decode as a space; its three byte pieces decode back to "▁".
    meta_space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SPACE.encode()]
    ids = []
    for i, part in enumerate(text.split(_META_SPACE)):
      ids += (meta_space_ids if i else []) + self._sp.encode(part)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: pad is dropped, bos/eos and chat tokens appear as their pieces."""
    parts, run = [], []
    for i in map(int, ids):
      if not 0 <= i < self.vocab_size:
        raise ValueError(
            f"token id {i} is out of range for this tokenizer; expected 0 <= id < "
            f"{self.vocab_size}; decode ids produced by the same tokenizer.")
      if i == PAD_ID:
        continue
      if self._sp.is_control(i):
        # SentencePiece silently drops bos/eos; show them so packed rows read clearly.
        parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    parts.append(self._sp.decode(run))
    return "".join(parts)

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary piece of one id (e.g. "▁the", "<0x0A>", "<|end|>")."""
    return self._sp.id_to_piece(int(token_id))

  def __reduce__(self):
    # Pickle as bytes: grain worker processes rebuild the processor on their side.
    return (Tokenizer, (self._model_bytes,))


def _check_layout(processor: spm.SentencePieceProcessor) -> None:
  """Raises if the model was not trained with the reserved-id layout of this module."""
  found = tuple(processor.id_to_piece(i) for i in range(min(len(RESERVED_PIECES),
                                                             processor.vocab_size())))
  first_byte = processor.piece_to_id("<0x00>")
  if found != RESERVED_PIECES or first_byte != len(RESERVED_PIECES):
    raise ValueError(
        f"tokenizer model has reserved pieces {found} and <0x00> at id {first_byte}; "
        f"expected {RESERVED_PIECES} then bytes from id {len(RESERVED_PIECES)}; "
        "retrain it with gptjax.tokenizer.train_tokenizer.")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, model_type: str = "bpe",
                    seed: int = 0, max_chars: int = 10_000_000) -> Tokenizer:
  """Trains a tokenizer in memory; the same texts and seed give identical model bytes."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported; expected one of "
                     f"{MODEL_TYPES}; pass one of them.")
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(
        f"vocab_size={vocab_size} is too small; expected at least {MIN_VOCAB_SIZE} "
        f"({len(RESERVED_PIECES)} reserved + {NUM_BYTE_PIECES} byte pieces) plus room for "
        "the text's characters; pass a larger vocab_size.")
  lines = _training_lines(texts, max_chars)
  if not lines:
    raise ValueError("train_tokenizer got no text; expected at least one non-empty line; "
                     "pass the training texts.")
  model = io.BytesIO()
  # With every line read and one thread, training is deterministic whatever the seed; the
  # seed only reaches SentencePiece's (global) RNG, used if input sampling is ever turned on.
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   **_trainer_options(vocab_size, model_type))
  except RuntimeError as e:
    raise _explain_training_error(e, vocab_size) from None
  return Tokenizer(model.getvalue())


def _training_lines(texts: Iterable[str], max_chars: int) -> list[str]:
  """Lines of `texts` for the line-based trainer, long ones split, max_chars in total."""
  lines, budget = [], max_chars
  for text in texts:
    for line in text.split(NEWLINE):
      for start in range(0, len(line), _MAX_LINE_CHARS):
        if budget <= 0:
          return lines
        lines.append(line[start:start + min(_MAX_LINE_CHARS, budget)])
        budget -= len(lines[-1])
  return lines


def _trainer_options(vocab_size: int, model_type: str) -> dict:
  """SentencePieceTrainer flags that give the reserved layout and an exact round trip."""
  return dict(
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(RESERVED_PIECES[4:]),
      byte_fallback=True,  # Any character outside the vocabulary becomes its UTF-8 bytes.
      normalization_rule_name="identity",  # NFKC would rewrite text, breaking the round trip.
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,  # Otherwise encode adds a leading "▁" that decode must guess.
      input_sentence_size=0,  # Read every line; `max_chars` already bounds the input.
      shuffle_input_sentence=False,
      num_threads=1,  # Single-threaded training is bit-for-bit reproducible.
      minloglevel=2,  # Training logs go to stderr in C++; keep them out of our output.
  )


def _explain_training_error(error: RuntimeError, vocab_size: int) -> ValueError:
  """Turns SentencePiece's vocabulary-size failures into an actionable one-line error."""
  message = str(error)
  too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
  if too_small:
    return ValueError(
        f"vocab_size={vocab_size} is too small for this text; expected at least "
        f"{too_small.group(1)} (reserved + byte pieces + one per distinct character); "
        "pass a larger vocab_size.")
  too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                        message)
  if too_large:
    return ValueError(
        f"vocab_size={vocab_size} is more than this text supports; expected at most "
        f"{too_large.group(1)}; pass a smaller vocab_size or more text.")
  return ValueError(f"SentencePiece training failed: {message.splitlines()[0]}; check the "
                    "training texts and train_tokenizer arguments.")
