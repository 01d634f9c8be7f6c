"""Reply quality: the scores, the held-out prompts (history only) and `eval --generate`."""

import json
import os
import shutil

import pytest
from conftest import gptjax, write_chats

from gptjax import dialogue, reply_eval, reply_metrics
from gptjax import generate as generate_lib
from gptjax import tokenizer as tokenizer_lib


def test_a_reply_equal_to_its_reference_scores_perfectly():
  for reference in ("Which dates?", "Booked a room in Paris from March 3, see you then."):
    scores = reply_metrics.turn_scores(reference, reference)
    assert scores["bleu"] == pytest.approx(100) and scores["chrf"] == pytest.approx(100)
    assert scores["rouge_l"] == pytest.approx(100) and not scores["degenerate"]
  references = ["Which dates?", "Booked a room in Paris.", "Anything else?"]
  corpus = reply_metrics.corpus_scores(references, references, [True] * 3)
  for key in ("bleu", "chrf", "rouge_l"):
    assert corpus[key] == pytest.approx(100), key
  assert corpus["length_ratio"] == 1 and corpus["ended_rate"] == 1
  assert corpus["degenerate_rate"] == 0 and corpus["turns"] == 3


def test_a_wrong_reply_scores_low_and_the_rates_count():
  corpus = reply_metrics.corpus_scores(["", "no no no no no", "Which city?"],
                                       ["Which dates?", "Booked it.", "Which city?"],
                                       [False, False, True])
  assert corpus["bleu"] < 50 and corpus["rouge_l"] == pytest.approx(100 / 3)
  assert corpus["ended_rate"] == pytest.approx(1 / 3)
  assert corpus["degenerate_rate"] == pytest.approx(2 / 3), "empty and repeating replies"
  assert corpus["reply_words"] == pytest.approx(7 / 3)
  # distinct-1: {no, Which, city?} of 7 words; distinct-2: {no no, Which city?} of 5 bigrams.
  assert corpus["distinct_1"] == pytest.approx(3 / 7)
  assert corpus["distinct_2"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("reply,degenerate", [
    ("", True), ("   ", True), ("the the the the the", True),
    ("a room for you a room for you a room for you", True),
    ("Which dates? Which dates?", False), ("Booked a room in Paris.", False)])
def test_degenerate_replies_are_empty_or_repeat_an_ngram(reply, degenerate):
  assert reply_metrics.is_degenerate(reply) == degenerate


class _Parrot:
  """A stand-in model that records its prompts and replies with the last message's end: if a
  reference reached its prompt, the reply would repeat it."""
  max_len = 512

  def __init__(self):
    self.prompts = []

  def generate(self, prompts, sampling):
    self.prompts += [list(p) for p in prompts]
    # The prompt ends [..., content, <|end|>, <|assistant|>]: parrot the content's last tokens.
    return [generate_lib.Completion(prompt_index=i, sample_index=0, tokens=list(p[-6:-2]),
                                    finish_reason="stop", prompt_tokens=len(p), truncated=0)
            for i, p in enumerate(prompts)]


def test_replies_are_generated_from_the_history_before_each_turn(tmp_path,
                                                                  tiny_tokenizer_file):
  tokenizer = tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)
  conversations, _ = dialogue.read_jsonl(write_chats(tmp_path / "dev.jsonl", 5))
  turns = reply_eval.held_out_turns(conversations, 3)
  assert [(t.conversation, t.reply_index) for t in turns] == [
      (c, k) for c in range(3) for k in (1, 2)]
  parrot = _Parrot()
  prompts, completions = reply_eval.generate_replies(parrot, tokenizer, turns,
                                                     reply_eval.DEFAULT_SAMPLING, batch_size=4)
  assert len(parrot.prompts) == 6 and sorted(map(tuple, parrot.prompts)) == sorted(
      map(tuple, prompts)), "every turn decoded once, in batches"
  for turn, prompt, messages in zip(turns, prompts, [c for c in conversations[:3]
                                                     for _ in (1, 2)]):
    cut = [i for i, m in enumerate(messages) if m["role"] == "assistant"][turn.reply_index - 1]
    assert prompt == dialogue.render_prompt(messages[:cut], tokenizer)
    assert turn.reference not in tokenizer.decode(prompt)
  replies = [tokenizer.decode(c.tokens) for c in completions]
  _, corpus = reply_eval.score_turns(turns, replies, [c.finish_reason for c in completions])
  assert corpus["bleu"] < 50, "a parrot of the history cannot know the reference"


def test_a_long_history_loses_its_oldest_exchanges(tiny_tokenizer_file):
  tokenizer = tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)
  history = [{"role": "system", "content": "Be brief."}]
  for i in range(6):
    history += [{"role": "user", "content": f"Question number {i} about hotels?"},
                {"role": "assistant", "content": f"Answer number {i} about hotels."}]
  history.append({"role": "user", "content": "And the last one?"})
  whole = dialogue.render_prompt(history, tokenizer)
  prompt = reply_eval.fitted_prompt(history, tokenizer, len(whole) - 1)
  assert len(prompt) < len(whole)
  text = tokenizer.decode(prompt)
  assert "Be brief." in text and "And the last one?" in text and "number 0" not in text
  assert prompt[:2] == [tokenizer.bos_id, tokenizer.system_id]
  assert prompt[prompt.index(tokenizer.end_id) + 1] == tokenizer.user_id


@pytest.mark.slow
def test_eval_generate_is_reproducible_and_writes_the_turns(trained_runs):
  workdir = os.path.join(trained_runs["pipeline"], "dialogue")
  sampling = generate_lib.Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
  first = reply_eval.evaluate_replies(workdir, num_conversations=3, sampling=sampling)
  with open(first["file"]) as f:
    records = [json.loads(line) for line in f]
  second = reply_eval.evaluate_replies(workdir, num_conversations=3, sampling=sampling)
  with open(second["file"]) as f:
    assert [json.loads(line) for line in f] == records, "same settings, same replies"
  assert first["turns"] == len(records) == 6 and first["conversations"] == 3
  assert first["sampling"]["temperature"] == 0.8 and first["sampling"]["seed"] == 3
  assert {"history", "reference", "reply", "finish_reason", "scores"} <= set(records[0])
  assert all(r["reply_tokens"] <= 8 for r in records)
  with open(os.path.join(workdir, reply_eval.SUMMARY_FILE)) as f:
    assert json.load(f)["bleu"] == first["bleu"]

  out = gptjax("eval", "--workdir", workdir, "--generate", "--num_conversations", 2,
               "--max_new_tokens", 8, "--json", check=True)
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["turns"] == 4 and summary["sampling"]["temperature"] == 0.0, "greedy default"
  assert 0 <= summary["ended_rate"] <= 1 and "chrf" in summary


@pytest.mark.slow
def test_eval_generate_falls_back_from_a_damaged_latest_step(trained_runs, tmp_path, capfd):
  from test_robust_damage import damage

  workdir = str(shutil.copytree(os.path.join(trained_runs["pipeline"], "dialogue"),
                                tmp_path / "dialogue"))
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  damage(os.path.join(workdir, "checkpoints", str(steps[-1])), "truncated_arrays")
  summary = reply_eval.evaluate_replies(
      workdir, num_conversations=1, sampling=generate_lib.Sampling(max_new_tokens=2))
  assert summary["step"] == steps[-2]
  assert f"checkpoint {steps[-1]}" in capfd.readouterr().err
