"""Conversations: the chat template, dialogue sources and their validation.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
The one chat template, used for training and for generation alike, renders it as

  <bos> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ... <eos>

where each role marker and `<|end|>` is one reserved token. Every assistant turn ends with
`<|end|>`, which is a training target, so the model learns when to stop talking.

Loss weights (dialogue regression): assistant content tokens and their `<|end|>` weigh 1;
every other token (system and user turns, role markers, bos/eos) weighs `history_weight`.
`history_weight=1` is the likelihood of the whole dialogue; `0` trains on replies only.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from gptjax import data as data_lib
from gptjax import dialogue_loss
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class BadConversation(UserError):
  """A conversation or record that cannot be used for training."""


def role_id(tokenizer: Tokenizer, role: str) -> int:
  return {"system": tokenizer.system_id, "user": tokenizer.user_id,
          "assistant": tokenizer.assistant_id}[role]


def check_conversation(messages) -> list[dict]:
  """Returns the messages as plain dicts, or raises BadConversation saying what is wrong."""
  if not isinstance(messages, list) or not messages:
    raise BadConversation("'messages' is not a non-empty list")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise BadConversation(f"message {i} is not an object with 'role' and 'content'")
    if m["role"] not in ROLES:
      raise BadConversation(f"message {i} has unknown role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
    if not isinstance(m["content"], str) or not m["content"].strip():
      raise BadConversation(f"message {i} ({m['role']}) has empty content")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["role"] == "assistant" for m in out):
    raise BadConversation("the conversation has no assistant turn")
  return out


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A conversation as tokens [N] with per-token weights [N] and an assistant mask [N].

  `weights[i]` and `assistant[i]` describe predicting `tokens[i]` (the packer shifts them
  onto targets).
  """
  tokens: np.ndarray
  weights: np.ndarray
  assistant: np.ndarray
  # The conversation's number of this rendering's first reply: above 1 for a rendering that
  # starts late, so per-reply metrics follow the conversation (gptjax/dialogue_loss.py).
  first_reply: int = 1


def _encode_turns(messages: Sequence[dict], tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
  """(role, content ids) of each message. Chat-token literals in a content stay text: only
  the template places chat tokens, so no message can end its turn or open another."""
  return [(m["role"], tokenizer.encode(m["content"], chat_tokens=False)) for m in messages]


def _assemble(turns: Sequence[tuple[str, list[int]]], tokenizer: Tokenizer,
              history_weight: float, add_generation_prompt: bool,
              dropped: Sequence[tuple[str, list[int]]] = ()) -> Rendered:
  """The template over already-encoded (role, content ids) turns."""
  tokens, assistant = [tokenizer.bos_id], [0.0]
  for role, content in turns:
    is_reply = 1.0 if role == "assistant" else 0.0
    tokens += [role_id(tokenizer, role), *content, tokenizer.end_id]
    # The role marker is predicted from the history; the content and <|end|> are the reply.
    assistant += [0.0] + [is_reply] * (len(content) + 1)
  tokens.append(tokenizer.assistant_id if add_generation_prompt else tokenizer.eos_id)
  assistant.append(0.0)
  assistant_N = np.asarray(assistant, np.float32)
  weights_N = np.where(assistant_N > 0, 1.0, history_weight).astype(np.float32)
  first_reply = 1 + sum(role == "assistant" for role, _ in dropped)
  return Rendered(np.asarray(tokens, np.int32), weights_N, assistant_N, first_reply)


def render(messages: Sequence[dict], tokenizer: Tokenizer, *, history_weight: float = 1.0,
           add_generation_prompt: bool = False) -> Rendered:
  """Renders messages with the chat template (see module docstring).

  With `add_generation_prompt`, the rendering ends with `<|assistant|>` instead of eos: the
  prompt a model continues with its reply.
  """
  return _assemble(_encode_turns(messages, tokenizer), tokenizer, history_weight,
                   add_generation_prompt)


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
  """Token ids of a chat history followed by `<|assistant|>`, ready for generation."""
  return render(messages, tokenizer, add_generation_prompt=True).tokens.tolist()


def _split_system(turns):
  """(leading system turn or [], the other turns)."""
  head = turns[:1] if turns and turns[0][0] == "system" else []
  return head, turns[len(head):]


def _fitting_start(head, body, max_tokens: int) -> int:
  """Index of the first of `body`'s turns that a rendering of at most `max_tokens` keeps:
  0 if all fit, else the earliest user turn (followed by a reply) from which the rest fit,
  else the last such user turn (that exchange alone is too long: the caller's error)."""
  # Template cost of a turn: role marker + content + <|end|>; plus bos and eos overall.
  sizes = [len(content) + 2 for _, content in body]
  budget = max_tokens - 2 - sum(len(c) + 2 for _, c in head)
  if sum(sizes) <= budget:
    return 0
  starts = [i for i, (role, _) in enumerate(body) if role == "user"
            and any(r == "assistant" for r, _ in body[i:])] or [0]
  fitting = [i for i in starts if sum(sizes[i:]) <= budget]
  return fitting[0] if fitting else starts[-1]


def render_fitting(messages: Sequence[dict], tokenizer: Tokenizer, max_tokens: int, *,
                   history_weight: float = 1.0) -> tuple[Rendered, bool]:
  """Renders a conversation in at most `max_tokens`, dropping its oldest turns if needed.

  Keeps a leading system message and the most recent turns from a user turn onwards (so
  every kept reply has the context before it). Returns (rendering, whether it was cut). If
  even the last exchange is too long it is returned whole: longer than `max_tokens`, which
  the dialogue stage reports as an error naming the conversation (packing never splits one).
  """
  head, body = _split_system(_encode_turns(messages, tokenizer))
  start = _fitting_start(head, body, max_tokens)
  return (_assemble(head + body[start:], tokenizer, history_weight, False, body[:start]),
          start > 0)


def render_windows(messages: Sequence[dict], tokenizer: Tokenizer, max_tokens: int, *,
                   history_weight: float = 1.0) -> list[Rendered]:
  """Renders a conversation as windows of at most `max_tokens` that train every reply once.

  The last window is `render_fitting`'s rendering; each window before it is the same cut of
  the turns it left out, so it ends at the reply before them. Every window keeps a leading
  system message and starts at a user turn (or the conversation's start). An earlier window's
  closing eos weighs 0: the conversation goes on there, so the model must not learn to end
  it. A conversation that fits is one window, its whole rendering.
  """
  head, body = _split_system(_encode_turns(messages, tokenizer))
  windows = []
  while not windows or any(role == "assistant" for role, _ in body):
    start = _fitting_start(head, body, max_tokens)
    window = _assemble(head + body[start:], tokenizer, history_weight, False, body[:start])
    if windows:
      window.weights[-1] = 0.0
    windows.append(window)
    body = body[:start]
  return windows[::-1]


def conversation_document(rendered: Rendered) -> dict[str, np.ndarray]:
  """The packer's document for a rendered conversation, with the per-token `role` and `turn`
  rows of the loss by dialogue structure."""
  role, turn = dialogue_loss.role_turn_arrays(rendered.tokens.tolist(), rendered.first_reply)
  return {"tokens": rendered.tokens, "weights": rendered.weights,
          "assistant": rendered.assistant, "role": role, "turn": turn}


def as_text(messages: Sequence[dict]) -> str:
  """Plain-text transcript, one "Role: content" line a turn (dialogues as pretraining text)."""
  return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)


# ----------------------------------------------------------------------------- sources


def sgd_messages(record) -> list[dict]:
  """tfds schema_guided_dialogue: utterances alternate from first_speaker (0 USER, 1 SYSTEM).

  USER becomes `user` and SYSTEM (the service agent) becomes `assistant`.
  """
  roles = ("user", "assistant") if int(record["first_speaker"]) == 0 else ("assistant", "user")
  return [{"role": roles[i % 2], "content": _text(u)}
          for i, u in enumerate(record["utterances"])]


# tfds dialogue datasets: name -> record-to-messages converter.
TFDS_DIALOGUES = {"schema_guided_dialogue": sgd_messages}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class LoadReport:
  """What loading a source kept and skipped (bad records are counted, never fatal)."""
  source: str
  used: int = 0
  skipped: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)  # The first few, located.
  where: list[str] = dataclasses.field(default_factory=list)  # Of each used conversation.
  unit: str = "conversations"  # What a record is, for the summary.

  def skip(self, where: str, why: str, strict: bool):
    if strict:
      raise BadConversation(f"{where}: {why} (data.strict=True stops at the first bad record; "
                            "fix it or set --config.data.strict=False to skip bad records).")
    self.skipped += 1
    if len(self.problems) < 5:
      self.problems.append(f"{where}: {why}")

  def summary(self) -> str:
    line = f"{self.source}: {self.used} {self.unit}"
    if self.skipped:
      line += f", {self.skipped} bad records skipped (first: {'; '.join(self.problems)})"
    return line


def jsonl_objects(path: str, report: LoadReport, strict: bool):
  """(where, object) of each non-blank line of a JSONL file that holds a JSON object; other
  lines (not UTF-8, invalid JSON, not an object) are skipped into `report`."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        report.skip(where, "not UTF-8", strict)
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        report.skip(where, f"invalid JSON ({e.msg})", strict)
        continue
      if not isinstance(record, dict):
        report.skip(where, "not a JSON object", strict)
        continue
      yield where, record


def read_jsonl(path: str, *, strict: bool = False) -> tuple[list[list[dict]], LoadReport]:
  """Conversations from a JSONL file, one {"messages": [{"role", "content"}, ...]} a line."""
  if not os.path.exists(path):
    raise UserError(f"Dialogue file {path} does not exist; pass a JSONL file with one "
                     '{"messages": [...]} object a line.')
  report, conversations = LoadReport(path), []
  for where, record in jsonl_objects(path, report, strict):
    if "messages" not in record:
      report.skip(where, "no 'messages' field", strict)
      continue
    try:
      conversations.append(check_conversation(record["messages"]))
      report.where.append(where)
    except BadConversation as e:
      report.skip(where, str(e), strict)
  report.used = len(conversations)
  return conversations, report


def read_tfds(name: str, split: str, data_dir: str | None = None, *,
              strict: bool = False) -> tuple[list[list[dict]], LoadReport]:
  """Conversations of a tfds dialogue dataset split (see TFDS_DIALOGUES)."""
  if name not in TFDS_DIALOGUES:
    raise UserError(f"tfds dataset {name!r} is not a known dialogue dataset; expected one of "
                     f"{sorted(TFDS_DIALOGUES)} or JSONL files in data.train_files.")
  source = data_lib.load_source(name, split, data_dir)
  report, conversations = LoadReport(f"{name}[{split}]"), []
  for index in range(len(source)):
    where = f"{name}[{split}] record {index}"
    try:
      conversations.append(check_conversation(TFDS_DIALOGUES[name](source[index])))
      report.where.append(where)
    except BadConversation as e:
      report.skip(where, str(e), strict)
  report.used = len(conversations)
  return conversations, report


def load(spec: str, split: str, data_dir: str | None = None, *,
         strict: bool = False) -> tuple[list[list[dict]], LoadReport]:
  """Conversations from a JSONL path (`*.jsonl`) or a tfds dialogue dataset name."""
  if spec.endswith(".jsonl"):
    conversations, report = read_jsonl(spec, strict=strict)
  else:
    conversations, report = read_tfds(spec, split, data_dir, strict=strict)
  if not conversations:
    raise UserError(f"{report.summary()}: no usable conversation; expected at least one with "
                     "an assistant turn; check the source.")
  return conversations, report
