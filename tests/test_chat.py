"""Chat sessions: history, trimming to the context, interruption, and the `chat` command."""

import io
import json

import jax
import jax.numpy as jnp
import pytest
from conftest import TOKENIZER_VOCAB, gptjax, make_mesh
from test_generate import RULES

from gptjax import chat
from gptjax import dialogue
from gptjax import generate
from gptjax import model as model_lib
from gptjax import tokenizer as tokenizer_lib

MAX_LEN = 64
# No stop token: every reply is exactly max_new_tokens long, whatever the random model says.
SAMPLING = generate.Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_file):
  return tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)


@pytest.fixture(scope="module")
def generator():
  cfg = model_lib.ModelConfig(vocab_size=TOKENIZER_VOCAB, num_layers=2, num_heads=2, d_model=32,
                              d_ff=64, max_len=MAX_LEN)
  model = model_lib.Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  mesh = make_mesh()
  return generate.Generator(model, params, mesh, RULES, stop_ids=())


def _session(generator, tokenizer, **kwargs):
  notices = []
  session = chat.ChatSession(generator, tokenizer, SAMPLING, notice=notices.append, **kwargs)
  return session, notices


def test_history_is_kept_across_turns(generator, tokenizer):
  session, _ = _session(generator, tokenizer)
  first = session.reply("Good morrow, cousin.")
  second = session.reply("What news?")
  assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
  assert session.messages[1]["content"] == first.text and first.tokens == SAMPLING.max_new_tokens
  assert second.prompt_tokens == len(dialogue.render_prompt(session.messages[:3], tokenizer))
  assert second.prompt_tokens > first.prompt_tokens + first.tokens


def test_oldest_turns_are_dropped_when_the_context_is_full_and_said_once(generator, tokenizer):
  session, notices = _session(generator, tokenizer, system="Be brief.")
  budget = MAX_LEN - session.reserve
  replies = [session.reply(f"Tell me about the {i}th king of England.") for i in range(8)]
  assert all(r.prompt_tokens <= budget for r in replies)
  assert len(notices) == 1 and "dropping the oldest turns" in notices[0]
  assert session.messages[0] == {"role": "system", "content": "Be brief."}
  assert session.messages[1]["role"] == "user" and len(session.messages) < 2 * 8 + 1
  assert session.messages[-2]["content"] == "Tell me about the 7th king of England."


def test_reset_forgets_all_but_the_system_message(generator, tokenizer):
  session, _ = _session(generator, tokenizer, system="Be brief.")
  first = session.reply("Hello there.")
  session.reply("And again.")
  session.reset()
  assert session.messages == [{"role": "system", "content": "Be brief."}]
  assert session.reply("Hello there.").prompt_tokens == first.prompt_tokens


def test_a_message_too_long_for_the_context_is_an_error_that_keeps_the_history(
    generator, tokenizer):
  session, _ = _session(generator, tokenizer)
  session.reply("Hello there.")
  before = list(session.messages)
  with pytest.raises(ValueError, match="send a shorter message"):
    for _ in session.send("word " * MAX_LEN):
      pass
  assert session.messages == before


def test_stopping_a_reply_early_keeps_what_was_shown(generator, tokenizer):
  session, _ = _session(generator, tokenizer)
  stream = session.send("Speak.")
  shown = next(stream)
  stream.close()
  assert session.last.finish_reason == "interrupted"
  assert session.messages[-1] == {"role": "assistant", "content": shown}


def test_run_handles_commands_and_ctrl_c_stops_only_that_reply(generator, tokenizer,
                                                               monkeypatch):
  session, _ = _session(generator, tokenizer)
  stream = generator.stream

  def interrupted_stream(prompt, sampling, chunk):
    it = stream(prompt, sampling, chunk)
    yield next(it)
    if session.turns == 2:
      raise KeyboardInterrupt  # As if Ctrl-C arrived while the second reply was decoding.
    yield from it

  monkeypatch.setattr(generator, "stream", interrupted_stream)
  out, err = io.StringIO(), io.StringIO()
  lines = ["Hello there.", "Go on.", "", "/reset", "Hello there.", "/exit", "Never sent."]
  assert chat.run(session, lines, as_json=True, out=out, err=err) == 0
  replies = [json.loads(line) for line in out.getvalue().splitlines()]
  assert [r["finish_reason"] for r in replies] == ["length", "interrupted", "length"]
  assert replies[2]["prompt_tokens"] == replies[0]["prompt_tokens"], "/reset clears history"
  assert "History cleared" in err.getvalue()
  assert session.turns == 3


def test_replies_stream_as_text_without_json(generator, tokenizer):
  session, _ = _session(generator, tokenizer)
  out = io.StringIO()
  assert chat.run(session, ["Hello there.", "word " * MAX_LEN], out=out, err=io.StringIO()) == 1
  assert out.getvalue() == session.messages[1]["content"] + "\n"


# ----------------------------------------------------------------------------- the command



@pytest.mark.slow
def test_chat_command_through_stdin_keeps_history_and_truncates_when_full(trained_workdir):  # noqa: F811
  turns = ["Good morrow.", "What news?", "Speak again.", "And more.", "Still more.",
           "Once more.", "The last one."]
  lines = turns + ["/reset", "Good morrow.", "/exit", "Not sent."]
  out = gptjax("chat", "--workdir", trained_workdir, "--json", "--max_new_tokens", "4",
               stdin="\n".join(lines) + "\n")
  assert out.returncode == 0, out.stderr
  replies = [json.loads(line) for line in out.stdout.splitlines()]
  assert len(replies) == len(turns) + 1
  assert all({"reply", "tokens", "tokens_per_sec"} <= set(r) for r in replies)
  assert replies[1]["prompt_tokens"] > replies[0]["prompt_tokens"], "history is kept"
  assert max(r["prompt_tokens"] for r in replies) <= 64 - 4, "history fits the context"
  assert out.stderr.count("dropping the oldest turns") == 1
  assert replies[-1]["prompt_tokens"] == replies[0]["prompt_tokens"], "/reset clears history"


@pytest.mark.slow
def test_chat_command_replies_to_each_message_flag(trained_workdir):  # noqa: F811
  args = ["chat", "--workdir", trained_workdir, "--system", "Be brief.", "--message", "Hello.",
          "--message", "Bye.", "--max_new_tokens", "3", "--temperature", "0"]
  out = gptjax(*args, "--json")
  assert out.returncode == 0, out.stderr
  replies = [json.loads(line) for line in out.stdout.splitlines()]
  assert len(replies) == 2 and all(r["tokens"] <= 3 for r in replies)
  text = gptjax(*args)
  assert text.stdout == "".join(r["reply"] + "\n" for r in replies), "greedy: the same replies"
  bad = gptjax("chat", "--workdir", trained_workdir, "--message", "Hi.", "--top_p", "0")
  assert bad.returncode == 1 and "top_p=0.0 is outside (0, 1]" in bad.stderr
