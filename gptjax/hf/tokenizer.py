"""The second tokenizer kind: a `tokenizers`-library tokenizer (a model's `tokenizer.json`).

It offers what gptjax uses of gptjax.tokenizer.Tokenizer (ids of bos, eos, pad and the chat
tokens, encode with or without chat tokens, decode, save) so the chat template, `chat` and
the data pipeline work unchanged. It is stored in a workdir's `tokenizer.model` as one JSON
document (`FORMAT`): the tokenizer.json (with gptjax's chat tokens added as special tokens),
the names of its bos/eos/pad tokens, and the model's vocabulary size, which may exceed the
tokenizer's (rows padded so the vocabulary shards); those extra ids decode to nothing.
"""

import json
import os
from collections.abc import Iterable

import tokenizers

from gptjax import tokenizer as sp_lib

FORMAT = "gptjax-tokenizers/1"
# Model vocabularies are padded to a multiple of this, so the `vocab` axis shards over
# tensor-parallel meshes of up to 128 devices (and matmuls get friendly sizes).
VOCAB_MULTIPLE = 128


def padded_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
  return -(-size // multiple) * multiple


class TokenizersTokenizer:
  """A tokenizer.json behind gptjax's Tokenizer interface; pickles as its bytes."""

  def __init__(self, data: bytes):
    self._bytes = bytes(data)
    doc = json.loads(self._bytes)
    if doc.get("format") != FORMAT:
      raise ValueError(f"tokenizer file has format {doc.get('format')!r}; expected {FORMAT!r}; "
                       "import the model again with `gptjax import-hf`.")
    self._tok = tokenizers.Tokenizer.from_str(json.dumps(doc["tokenizer"]))
    self._vocab_size = int(doc["vocab_size"])
    self.real_vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special = dict(doc["special"])
    ids = {name: self._id(piece) for name, piece in self.special.items()}
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self.system_id, self.user_id, self.assistant_id, self.end_id = (
        self._id(piece) for piece in sp_lib.CHAT_TOKENS)
    self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items()
                         if t.special}

  def _id(self, piece: str) -> int:
    token_id = self._tok.token_to_id(piece)
    if token_id is None:
      raise ValueError(f"tokenizer has no token {piece!r}; expected it in its vocabulary; "
                       "import the model again with `gptjax import-hf`.")
    return token_id

  @classmethod
  def build(cls, tokenizer: tokenizers.Tokenizer, *, bos: str, eos: str, pad: str,
            vocab_size: int) -> "TokenizersTokenizer":
    """Wraps a tokenizers.Tokenizer that already holds the chat tokens."""
    doc = {"format": FORMAT, "vocab_size": vocab_size,
           "special": {"bos": bos, "eos": eos, "pad": pad},
           "tokenizer": json.loads(tokenizer.to_str())}
    return cls(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode())

  @property
  def model_bytes(self) -> bytes:
    return self._bytes

  @property
  def vocab_size(self) -> int:
    """Ids the model has rows for (the tokenizer's, padded up)."""
    return self._vocab_size

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The tokenizers.Tokenizer (for export)."""
    return self._tok

  def save(self, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
      f.write(self._bytes)
    os.replace(tmp, path)

  def encode(self, text: str, *, chat_tokens: bool = True) -> list[int]:
    """Ids of text, without bos/eos; with `chat_tokens=False` every special token's literal
    (chat tokens, "<|endoftext|>", ...) stays text, as with SentencePiece."""
    self._tok.encode_special_tokens = not chat_tokens
    try:
      ids = self._tok.encode(text, add_special_tokens=False).ids
    finally:
      self._tok.encode_special_tokens = False
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens appear as their text, padding rows as nothing."""
    kept = []
    for i in map(int, ids):
      if not 0 <= i < self._vocab_size:
        raise ValueError(f"token id {i} is out of range for this tokenizer; expected 0 <= id "
                         f"< {self._vocab_size}; decode ids produced by the same tokenizer.")
      if i < self.real_vocab_size:
        kept.append(i)
    return self._tok.decode(kept, skip_special_tokens=False)

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id)) or ""

  def __reduce__(self):
    return (TokenizersTokenizer, (self._bytes,))


def add_chat_tokens(tokenizer: tokenizers.Tokenizer) -> int:
  """Adds gptjax's chat tokens the tokenizer lacks as special tokens; returns how many."""
  missing = [t for t in sp_lib.CHAT_TOKENS if tokenizer.token_to_id(t) is None]
  if missing:
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t in missing])
  return len(missing)
