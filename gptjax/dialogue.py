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
from collections.abc import Iterable, Sequence

import numpy as np

from gptjax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class BadConversation(ValueError):
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
  onto targets); `turn_starts` are the token offsets where each message begins.
  """
  tokens: np.ndarray
  weights: np.ndarray
  assistant: np.ndarray
  turn_starts: tuple[int, ...]


def render(messages: Sequence[dict], tokenizer: Tokenizer, *, history_weight: float = 1.0,
           add_generation_prompt: bool = False) -> Rendered:
  """Renders messages with the chat template (see module docstring).

  With `add_generation_prompt`, no eos is appended and the rendering ends with
  `<|assistant|>`: the prompt a model continues with its reply.
  """
  tokens, assistant, starts = [tokenizer.bos_id], [0.0], []
  for m in messages:
    starts.append(len(tokens))
    content = tokenizer.encode(m["content"])
    is_reply = 1.0 if m["role"] == "assistant" else 0.0
    tokens += [role_id(tokenizer, m["role"]), *content, tokenizer.end_id]
    # The role marker is predicted from the history, the content and <|end|> are the reply.
    assistant += [0.0] + [is_reply] * (len(content) + 1)
  if add_generation_prompt:
    tokens.append(tokenizer.assistant_id)
    assistant.append(0.0)
  else:
    tokens.append(tokenizer.eos_id)
    assistant.append(0.0)
  assistant_N = np.asarray(assistant, np.float32)
  weights_N = np.where(assistant_N > 0, 1.0, history_weight).astype(np.float32)
  return Rendered(np.asarray(tokens, np.int32), weights_N, assistant_N, tuple(starts))


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
  """Token ids of a chat history followed by `<|assistant|>`, ready for generation."""
  return render(messages, tokenizer, add_generation_prompt=True).tokens.tolist()
