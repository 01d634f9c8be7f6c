"""Multi-turn chat: the history, fitting it into the context, and replies streamed as decoded.

Every turn renders the whole history with the one chat template (`dialogue.render_prompt`,
the same as in training) and the model replies until `<|end|>`. When the history would
leave less than `reserve` tokens of the context for the reply, the oldest exchanges are
dropped (the system message stays). Replies stream in chunks of a few tokens, one compiled
call per chunk, so text appears as it is produced and Ctrl-C stops a reply between chunks.
"""

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from gptjax import dialogue
from gptjax import generate as generate_lib
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer

RESET, EXIT = "/reset", "/exit"


@dataclasses.dataclass
class Reply:
  """What one turn produced."""
  text: str
  tokens: int  # Reply tokens, <|end|> excluded.
  seconds: float  # From the message to the last token, prefill included.
  prompt_tokens: int  # The rendered history the reply was generated from.
  finish_reason: str  # "stop", "length", "context" or "interrupted".

  @property
  def tokens_per_sec(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0

  def json(self) -> str:
    return json.dumps({"reply": self.text, "tokens": self.tokens,
                       "tokens_per_sec": round(self.tokens_per_sec, 2),
                       "prompt_tokens": self.prompt_tokens,
                       "finish_reason": self.finish_reason})


def _stable_text(text: str) -> str:
  # A multi-byte character split across tokens decodes as U+FFFD until its last byte comes.
  return text.rstrip("\ufffd")


class ChatSession:
  """A conversation with one model: `send` a message, iterate over the reply's text."""

  def __init__(self, generator: generate_lib.Generator, tokenizer: Tokenizer,
               sampling: generate_lib.Sampling, *, system: str | None = None, chunk: int = 8,
               notice: Callable[[str], None] = lambda m: print(m, file=sys.stderr)):
    self.generator, self.tokenizer, self.sampling = generator, tokenizer, sampling
    self.system, self.chunk, self.notice = system, chunk, notice
    # Room kept for the reply: the history may use the rest of the context.
    self.reserve = min(sampling.max_new_tokens, generator.max_len // 2)
    self.messages: list[dict] = []
    self.turns = 0
    self.last: Reply | None = None
    self._warned = False
    self.reset()

  def reset(self):
    """Forgets the conversation (the system message stays)."""
    self.messages = [{"role": "system", "content": self.system}] if self.system else []

  def _prompt(self, messages: list[dict]) -> list[int]:
    """The rendered history, dropping the oldest exchanges until it leaves the reply room."""
    budget = self.generator.max_len - self.reserve
    first = 1 if self.system else 0
    ids = dialogue.render_prompt(messages, self.tokenizer)
    dropped = 0
    while len(ids) > budget and len(messages) - first > 1:
      # Drop the oldest message, then up to the next user message: history starts with one.
      del messages[first]
      while len(messages) - first > 1 and messages[first]["role"] != "user":
        del messages[first]
      dropped += 1
      ids = dialogue.render_prompt(messages, self.tokenizer)
    if len(ids) > budget:
      raise UserError(
          f"The message needs {len(ids)} tokens with the template"
          f"{' and system prompt' if self.system else ''}, more than the {budget} the "
          f"{self.generator.max_len}-token context leaves after {self.reserve} for the reply; "
          "send a shorter message or lower --max_new_tokens.")
    if dropped and not self._warned:
      self._warned = True
      self.notice(f"(The conversation outgrew the {self.generator.max_len}-token context: "
                  "dropping the oldest turns from now on.)")
    return ids

  def send(self, text: str) -> Iterator[str]:
    """Adds a user message and yields the reply's text as it is decoded.

    The reply joins the history when the iteration ends, also when it is cut short by
    closing the iterator or by Ctrl-C (then what was shown is kept, finish_reason
    "interrupted"). Raises ValueError, with the history unchanged, if the message cannot fit.
    """
    if not text.strip():
      raise UserError("The message is empty; type some text.")
    messages = self.messages + [{"role": "user", "content": text}]
    ids = self._prompt(messages)
    self.messages = messages
    self.turns += 1
    # A distinct seed per turn, so a repeated message gets a fresh reply, reproducibly.
    sampling = dataclasses.replace(
        self.sampling, num_samples=1, seed=(self.sampling.seed * 1_000_003 + self.turns) % 2**32)
    start, shown, tokens, reason = time.perf_counter(), "", [], "interrupted"
    try:
      for completion in self.generator.stream(ids, sampling, self.chunk):
        tokens = completion.tokens
        text_now = _stable_text(self.tokenizer.decode(tokens))
        if len(text_now) > len(shown):
          piece, shown = text_now[len(shown):], text_now
          yield piece
        if completion.finish_reason:
          reason = completion.finish_reason
      final = self.tokenizer.decode(tokens)
      if final != shown:
        yield final[len(shown):]
        shown = final
    finally:
      if shown or reason != "interrupted":
        self.messages.append({"role": "assistant", "content": shown})
      else:
        self.messages.pop()  # Stopped before a word: forget the unanswered message.
      self.last = Reply(text=shown, tokens=len(tokens), seconds=time.perf_counter() - start,
                        prompt_tokens=len(ids), finish_reason=reason)

  def reply(self, text: str) -> Reply:
    """Sends a message and returns the whole reply."""
    for _ in self.send(text):
      pass
    return self.last


def terminal_lines(prompt: str = "you> ") -> Iterator[str]:
  """Lines typed at the terminal until Ctrl-D; Ctrl-C at the prompt just starts a new line."""
  while True:
    try:
      yield input(prompt)
    except EOFError:
      print()
      return
    except KeyboardInterrupt:
      print()


def run(session: ChatSession, lines: Iterable[str], *, as_json: bool = False, out=None,
        err=None) -> int:
  """Sends each line to the session and prints the replies; returns an exit status.

  "/reset" clears the history and "/exit" leaves. Without `as_json` replies stream as
  they are decoded; with it each reply is one JSON line. The status is 1 if any message
  got no reply (too long for the context), else 0.
  """
  out, err = out or sys.stdout, err or sys.stderr
  status = 0
  for line in lines:
    message = line.rstrip("\n")
    if message.strip() == EXIT:
      break
    if message.strip() == RESET:
      session.reset()
      print("(History cleared.)", file=err, flush=True)
      continue
    if not message.strip():
      continue
    try:
      stream = session.send(message)
      try:
        for piece in stream:
          if not as_json:
            out.write(piece)
            out.flush()
      except KeyboardInterrupt:
        stream.close()
        if not as_json:
          out.write(" [stopped]")
    except ValueError as e:
      print(f"gptjax chat: error: {e}", file=err, flush=True)
      status = 1
      continue
    print(session.last.json() if as_json else "", file=out, flush=True)
  return status
