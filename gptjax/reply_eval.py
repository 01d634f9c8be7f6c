"""Reply quality on held-out conversations: generate at every assistant turn, score, record.

For each held-out conversation (the run's eval split, or a JSONL file) and each of its
assistant turns, the model replies to the real history before that turn, rendered with the
training chat template and nothing after it, so the reference never reaches the prompt. The
replies are decoded in batches through the KV-cache generator (gptjax/generate.py), prompts
sorted by length so a batch shares a padded length, with fixed sampling settings (greedy
unless told otherwise) that are recorded with the results. A history too long for the
context loses its oldest exchanges (a leading system message stays), leaving room for the
reply, as `chat` does.

Writes, on process 0:
  DIR/replies.jsonl         one turn a line: conversation, reply_index (1 = its first reply),
                            history, reference, reply, finish_reason, prompt_tokens, scores
  DIR/replies_summary.json  what `evaluate_replies` returns: settings and corpus scores
                            (gptjax/reply_metrics.py), read by the report card
"""

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax

from gptjax import datasets, dialogue, evaluate, reply_metrics
from gptjax import generate as generate_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer

TURNS_FILE, SUMMARY_FILE = "replies.jsonl", "replies_summary.json"
# Greedy, so scores are a property of the checkpoint; replies of the demo data are short.
DEFAULT_SAMPLING = generate_lib.Sampling(max_new_tokens=64, temperature=0.0, top_p=1.0)
DEFAULT_CONVERSATIONS = 50


@dataclasses.dataclass(frozen=True)
class Turn:
  """One assistant turn of a held-out conversation."""
  conversation: int  # Index of the conversation in the held-out set.
  reply_index: int  # 1 for the conversation's first assistant turn, 2 for its second, ...
  history: list[dict]  # The messages before the turn.
  reference: str  # What the assistant said.


def held_out_turns(conversations: Sequence[list[dict]], num_conversations: int = 0) -> list[Turn]:
  """Every assistant turn of the first `num_conversations` conversations (0: all)."""
  turns = []
  for c, messages in enumerate(conversations[:num_conversations or None]):
    replies = 0
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        replies += 1
        turns.append(Turn(c, replies, list(messages[:i]), message["content"]))
  return turns


def fitted_prompt(history: Sequence[dict], tokenizer: Tokenizer, budget: int) -> list[int]:
  """The generation prompt of `history` in at most `budget` tokens if it can be: the latest
  history that starts at a user turn (or the start) and fits, a leading system message kept.
  When even the last user turn is too long, the generator keeps the prompt's end."""
  head = list(history[:1]) if history and history[0]["role"] == "system" else []
  body = list(history[len(head):])
  starts = [0] + [i for i, m in enumerate(body) if i and m["role"] == "user"]
  for start in starts:
    prompt = dialogue.render_prompt(head + body[start:], tokenizer)
    if len(prompt) <= budget:
      break
  return prompt


def generate_replies(generator, tokenizer: Tokenizer, turns: Sequence[Turn],
                     sampling: generate_lib.Sampling, batch_size: int = 64):
  """(prompts, completions) of every turn, in `turns`' order, decoded `batch_size` at a time."""
  sampling = dataclasses.replace(sampling, num_samples=1)
  budget = generator.max_len - min(sampling.max_new_tokens, generator.max_len // 2)
  prompts = [fitted_prompt(t.history, tokenizer, budget) for t in turns]
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  completions = [None] * len(prompts)
  for lo in range(0, len(order), batch_size):
    chunk = order[lo:lo + batch_size]
    for i, completion in zip(chunk, generator.generate([prompts[i] for i in chunk], sampling)):
      completions[i] = completion
  return prompts, completions


def score_turns(turns: Sequence[Turn], replies: Sequence[str],
                finish_reasons: Sequence[str | None]) -> tuple[list[dict], dict]:
  """(one record a turn, the corpus scores) of the replies to `turns`."""
  records = [{"conversation": t.conversation, "reply_index": t.reply_index,
              "history": t.history, "reference": t.reference, "reply": reply,
              "finish_reason": reason, "scores": reply_metrics.turn_scores(reply, t.reference)}
             for t, reply, reason in zip(turns, replies, finish_reasons)]
  corpus = reply_metrics.corpus_scores(replies, [t.reference for t in turns],
                                       [r == "stop" for r in finish_reasons])
  return records, corpus


def evaluate_replies(workdir: str, *, split: str | None = None, step: str | None = None,
                     num_conversations: int = DEFAULT_CONVERSATIONS,
                     sampling: generate_lib.Sampling = DEFAULT_SAMPLING, batch_size: int = 64,
                     mesh=None) -> dict:
  """Generates and scores replies of a dialogue run's checkpoint (see the module docstring)."""
  config = workdir_lib.read_config(workdir)
  if config.data.kind != "dialogue":
    raise UserError(f"{workdir} is a data.kind={config.data.kind!r} run; `eval --generate` "
                    "needs a dialogue run (its replies are scored against conversations).")
  data = evaluate.with_eval_split(config.data, split) if split else config.data
  if not datasets.has_eval(data):
    raise UserError(f"{workdir} has no eval conversations configured; pass --split NAME or "
                    "--split FILE.jsonl.")
  conversations, _ = datasets.conversations(data, "eval")
  turns = held_out_turns(conversations, num_conversations)
  # A damaged latest step falls back to the newest that restores (see Checkpoints.load).
  generator, tokenizer = generate_lib.load(workdir, step, mesh=mesh)
  start = time.perf_counter()
  prompts, completions = generate_replies(generator, tokenizer, turns, sampling, batch_size)
  seconds = time.perf_counter() - start
  replies = [tokenizer.decode(c.tokens) for c in completions]
  records, corpus = score_turns(turns, replies, [c.finish_reason for c in completions])
  for record, prompt, completion in zip(records, prompts, completions):
    record["prompt_tokens"] = len(prompt)
    record["reply_tokens"] = len(completion.tokens)
  summary = {"step": generator.step, "split": split or evaluate.eval_name(data),
             "conversations": len({t.conversation for t in turns}),
             "sampling": dataclasses.asdict(sampling), **corpus,
             "generate_seconds": seconds, "file": os.path.join(workdir, TURNS_FILE)}
  if jax.process_index() == 0:
    workdir_lib.atomic_write(summary["file"],
                             "".join(json.dumps(r) + "\n" for r in records))
    workdir_lib.atomic_write(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2))
  return summary
