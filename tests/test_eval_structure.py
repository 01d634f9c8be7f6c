"""Loss by dialogue structure: per-token role and reply index, and the sums over them."""

import jax
import numpy as np
import pytest
from conftest import compile_programs, make_mesh, tiny_config

from gptjax import data, dialogue, dialogue_loss, evaluate
from gptjax import tokenizer as tokenizer_lib

S, U, A, T = (dialogue_loss.ROLE_CODES[r] for r in ("system", "user", "assistant", "template"))


def _conversation(replies: int) -> list[dict]:
  messages = [{"role": "system", "content": "Be brief."}]
  for k in range(1, replies + 1):
    messages += [{"role": "user", "content": f"Question {k}?"},
                 {"role": "assistant", "content": f"Answer {k}."}]
  return messages


def test_each_token_gets_its_turns_role_and_reply_index(tiny_tokenizer_file):
  tokenizer = tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)
  rendered = dialogue.render(_conversation(2), tokenizer)
  tokens = rendered.tokens.tolist()
  role, turn = dialogue_loss.role_turn_arrays(tokens)
  # The assistant role covers exactly the `assistant` mask: reply content and its <|end|>.
  np.testing.assert_array_equal(role == A, rendered.assistant > 0)
  assert role[0] == T and role[-1] == T, "bos and eos are template tokens"
  markers = [i for i, t in enumerate(tokens) if t in (tokenizer.system_id, tokenizer.user_id,
                                                      tokenizer.assistant_id)]
  assert (role[markers] == T).all()
  ends = [i for i, t in enumerate(tokens) if t == tokenizer.end_id]
  assert list(role[ends]) == [S, U, A, U, A], "an <|end|> belongs to the turn it closes"
  assert set(role[1:markers[1]]) == {T, S} and set(turn[role != A]) == {0}
  replies = [int(k) for k in turn[role == A]]
  assert replies == sorted(replies) and set(replies) == {1, 2}
  # A window starting at the conversation's 7th reply numbers its replies from there.
  _, late = dialogue_loss.role_turn_arrays(tokens, first_reply=7)
  assert set(late[role == A]) == {7, 8}


def test_structure_sums_are_token_weighted_means_by_bucket():
  rng = np.random.default_rng(0)
  nll_BL = rng.random((4, 16)).astype(np.float32)
  role_BL = rng.integers(0, 5, (4, 16)).astype(np.float32)
  turn_BL = np.where(role_BL == A, rng.integers(1, 9, (4, 16)), 0).astype(np.float32)
  sums = dialogue_loss.structure_sums(nll_BL, role_BL, turn_BL)
  metrics = dialogue_loss.structure_metrics({k: float(v) for k, v in sums.items()})
  for name, code in dialogue_loss.ROLE_CODES.items():
    assert metrics[f"loss_role_{name}"] == pytest.approx(nll_BL[role_BL == code].mean(), 1e-5)
    assert metrics[f"tokens_role_{name}"] == (role_BL == code).sum()
  assert metrics["loss_turn_2"] == pytest.approx(nll_BL[turn_BL == 2].mean(), 1e-5)
  assert metrics["loss_turn_5plus"] == pytest.approx(nll_BL[turn_BL >= 5].mean(), 1e-5)
  assert metrics["tokens_turn_5plus"] == (turn_BL >= 5).sum()
  assert set(dialogue_loss.metric_names()) <= set(metrics)
  empty = dialogue_loss.structure_sums(nll_BL, np.zeros_like(role_BL), np.zeros_like(turn_BL))
  assert dialogue_loss.structure_metrics({k: float(v) for k, v in empty.items()}) == {}, (
      "a bucket without tokens is left out, not reported as a loss of 0")


def _documents(tokenizer):
  """Rendered conversations of 1-6 replies with role and turn rows, as the packer takes them."""
  docs = []
  for replies in range(1, 7):
    rendered = dialogue.render(_conversation(replies), tokenizer, history_weight=0.5)
    role, turn = dialogue_loss.role_turn_arrays(rendered.tokens.tolist())
    docs.append({**dialogue.conversation_document(rendered), "role": role, "turn": turn})
  return docs


def test_eval_reports_the_structure_and_it_adds_up(tiny_tokenizer_file):
  tokenizer = tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)
  config = tiny_config()
  config.data.kind = "dialogue"
  batches = list(data.make_dataset(_documents(tokenizer), lambda d: d, seq_len=32, batch_size=8,
                                   seed=0, num_epochs=1,
                                   extra_keys=("assistant", "role", "turn")))
  programs = compile_programs(config, make_mesh(data=2))
  params = programs.init(jax.random.key(0)).params
  metrics = evaluate.evaluate(programs, params, batches)
  roles = [metrics[f"tokens_role_{r}"] for r in dialogue_loss.ROLE_CODES]
  assert sum(roles) == metrics["tokens"], "every target has one role"
  assert metrics["tokens_role_assistant"] == metrics["assistant_tokens"]
  turns = {k: metrics[f"tokens_turn_{k}"] for k in ("1", "2", "3", "4", "5plus")}
  assert sum(turns.values()) == metrics["assistant_tokens"]
  # 6 conversations have a 1st reply, 2 have a 5th or 6th: 4 of them in the last bucket.
  assert turns["1"] > turns["4"] > 0 and turns["5plus"] > 0
  pooled = sum(metrics[f"loss_turn_{k}"] * n for k, n in turns.items()) / sum(turns.values())
  assert pooled == pytest.approx(metrics["assistant_loss"], 1e-5)


def test_windows_number_their_replies_as_the_conversation_does(tiny_tokenizer_file):
  tokenizer = tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)
  windows = dialogue.render_windows(_conversation(6), tokenizer, 40)
  assert len(windows) > 1, "the conversation must not fit one window for this test"
  replies = []
  for window in windows:
    document = dialogue.conversation_document(window)
    trained = (document["role"] == A) & (document["weights"] > 0)
    replies += sorted({int(k) for k in document["turn"][trained]})
  assert replies == [1, 2, 3, 4, 5, 6], "every reply once, numbered in its conversation"
