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


# ----------------------------------------------------------------------------- export

# gptjax's chat template (gptjax/dialogue.py) in Jinja, for tokenizer_config.json: role
# markers and <|end|> are special tokens, so transformers' apply_chat_template gives the ids
# gptjax's renderer gives.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")


def _pieces(tokenizer) -> tuple[str, str, str]:
  return (tokenizer.id_to_piece(tokenizer.bos_id), tokenizer.id_to_piece(tokenizer.eos_id),
          tokenizer.id_to_piece(tokenizer.pad_id))


def from_sentencepiece(tokenizer: sp_lib.Tokenizer) -> tokenizers.Tokenizer:
  """A tokenizers.Tokenizer that encodes text to the ids of a gptjax SentencePiece model.

  The model's pieces (scores for unigram; for BPE, merges ordered by the merged piece's id,
  SentencePiece's merge priority) with byte fallback, spaces as "▁" split before each word
  (SentencePiece's whitespace split, no dummy prefix), and the reserved pieces as added
  tokens. Unlike gptjax's encoder, it reads a literal "▁" in text as a space.
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
  pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
  vocab = {p: i for i, p in enumerate(pieces)}
  unigram = _model_type(tokenizer.model_bytes) == "unigram"
  if unigram:
    model = tokenizers.models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)],
                                      unk_id=sp_lib.UNK_ID, byte_fallback=True)
  else:
    merges = []
    for i, piece in enumerate(pieces):
      if not sp.is_unknown(i) and not sp.is_control(i) and not sp.is_byte(i):
        for cut in range(1, len(piece)):
          left, right = piece[:cut], piece[cut:]
          if left in vocab and right in vocab:
            merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    model = tokenizers.models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token="<unk>",
                                  byte_fallback=True, fuse_unk=True)
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
  tok.decoder = tokenizers.decoders.Sequence([
      tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
      tokenizers.decoders.Fuse()])
  tok.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False)
                          for p in sp_lib.RESERVED_PIECES if p != sp_lib.NEWLINE])
  tok.add_tokens([tokenizers.AddedToken(sp_lib.NEWLINE, special=False, normalized=False)])
  return tok


def _model_type(model_bytes: bytes) -> str:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  return {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, "bpe")


def export_files(tokenizer, max_len: int) -> dict[str, str]:
  """File name -> text of the tokenizer files AutoTokenizer loads, for either kind."""
  if isinstance(tokenizer, TokenizersTokenizer):
    backend = tokenizer.backend
  else:
    backend = from_sentencepiece(tokenizer)
  bos, eos, pad = _pieces(tokenizer)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "pad_token": pad, "model_max_length": max_len, "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "add_bos_token": False,
            "add_eos_token": False}
  return {"tokenizer.json": backend.to_str(),
          "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
