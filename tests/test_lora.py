"""LoRA adapters (gptjax/lora.py): exact start, frozen base, merge, checkpoints, memory."""

import dataclasses
import functools
import json
import os

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import compile_programs, gptjax, make_mesh, run_stage, tiny_config

from gptjax import config as config_lib
from gptjax import evaluate as evaluate_lib
from gptjax import generate as generate_lib
from gptjax import lora as lora_lib
from gptjax import sharding
from gptjax import workdir as workdir_lib
from gptjax.bench import memory as memory_bench
from gptjax.errors import UserError
from gptjax.hf import exporter
from gptjax.serve import server as server_lib

ALL_TARGETS = "q,k,v,o,mlp_in,mlp_out"


def _lora_config(base=None, data_dir=None, rank=4, targets=ALL_TARGETS, **model):
  c = tiny_config(data_dir)
  c.model.update(max_len=64, **model)
  c.stage = "lora"
  c.init_from = base or "base"
  c.model.lora.update(rank=rank, alpha=8.0, targets=targets)
  c.train.update(learning_rate=1e-2)
  return c


def _batch(seed=0, rows=8, length=32, vocab=384):
  tokens = np.random.default_rng(seed).integers(8, vocab, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
          "weights": np.ones((rows, length), np.float32)}


def _programs_and_base(mesh, train_tokens="chat", steps=4, **model):
  c = _lora_config(**model)
  c.model.lora.train_tokens = train_tokens
  c.train.steps = steps
  config = config_lib.stage_config(c)
  programs = compile_programs(config, mesh)
  plain = compile_programs(config.replace(lora={"rank": 0}), mesh)
  base = plain.init(jax.random.key(1)).params
  return config, programs.with_base(base), plain, base


@pytest.mark.parametrize("model", [{}, {"scan_layers": True}, {"num_kv_heads": 1},
                                   {"tie_embeddings": False}],
                         ids=["blocks", "scanned", "grouped_query", "untied"])
def test_step_zero_is_exactly_the_base_model(model):
  config, programs, plain, base = _programs_and_base(make_mesh(), **model)
  adapters = programs.init(jax.random.key(0)).params
  rows = {"embedding"} | ({"head"} if "head" in base else set())
  assert set(adapters[lora_lib.TOKENS]) == rows
  merged = lora_lib.merge(base, adapters, config.lora)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), merged, base)
  tokens = jnp.asarray(_batch()["inputs"])
  np.testing.assert_array_equal(programs.model.apply({"params": merged}, tokens),
                                plain.model.apply({"params": base}, tokens))
  if model.get("num_kv_heads"):  # Separate q and kv kernels: v adapts kv's second slice only.
    assert set(adapters["block_0"]["attn"]) == {"q", "kv", "out"}
    moved = jax.tree.map(lambda x: x + 0.1, adapters)
    kv = lora_lib.merge(base, moved, config.lora)["block_0"]["attn"]["kv"]
    assert not np.array_equal(kv[:, 1], base["block_0"]["attn"]["kv"][:, 1])


def test_merge_equals_the_unmerged_low_rank_path():
  """x @ (W + s A B) for a fused-qkv slice and a two-input-axis kernel equals x @ W + s x A B."""
  config, programs, _, base = _programs_and_base(make_mesh())
  adapters = programs.init(jax.random.key(0)).params
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
                          adapters)  # B nonzero.
  merged = lora_lib.merge(base, adapters, config.lora)
  s = 8.0 / 4
  x_RD = jax.random.normal(jax.random.key(3), (5, 32))
  qkv, ab = base["block_1"]["attn"]["qkv"], adapters["block_1"]["attn"]["qkv"]["k"]
  want = (jnp.einsum("RD,DHK->RHK", x_RD, qkv[:, 1]).reshape(5, -1)
          + s * x_RD @ ab["lora_a"] @ ab["lora_b"])
  got = jnp.einsum("RD,DHK->RHK", x_RD, merged["block_1"]["attn"]["qkv"][:, 1]).reshape(5, -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  out, ab = base["block_0"]["attn"]["out"], adapters["block_0"]["attn"]["out"]["all"]
  h_RHK = jax.random.normal(jax.random.key(4), (5, 2, 16))
  want = (jnp.einsum("RHK,HKD->RD", h_RHK, out)
          + s * h_RHK.reshape(5, -1) @ ab["lora_a"] @ ab["lora_b"])
  got = jnp.einsum("RHK,HKD->RD", h_RHK, merged["block_0"]["attn"]["out"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Token rows: the chat tokens' embedding rows move by their delta, no other row moves.
  ids = np.asarray(config.lora.token_ids)
  assert list(ids) == [4, 5, 6, 7]
  np.testing.assert_array_equal(merged["embedding"][ids], base["embedding"][ids]
                                + adapters[lora_lib.TOKENS]["embedding"])
  others = np.setdiff1d(np.arange(base["embedding"].shape[0]), ids)
  np.testing.assert_array_equal(merged["embedding"][others], base["embedding"][others])


def test_only_adapters_train_and_optimizer_state_is_adapter_shaped():
  _, programs, _, base = _programs_and_base(make_mesh(data=2, fsdp=2, tensor=2))
  before = jax.device_get(base)
  state = programs.init(jax.random.key(0))
  start = jax.device_get(state.params)
  batch = sharding.global_batch(_batch(), programs.batch_sharding)
  for _ in range(3):
    state, _ = programs.train_step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), before)
  after = jax.device_get(state.params)
  b_moved = [np.abs(a["lora_b"]).max() for name, m in after.items() if name != lora_lib.TOKENS
             for k in m.values() for p in k.values() for a in p.values()]
  assert min(b_moved) > 0, "every adapter's B should have left zero"
  assert np.abs(after[lora_lib.TOKENS]["embedding"]).max(axis=1).min() > 0, \
      "every token row's delta should have left zero"
  assert not np.array_equal(after["block_0"]["attn"]["qkv"]["q"]["lora_a"],
                            start["block_0"]["attn"]["qkv"]["q"]["lora_a"])
  adapter_shapes = {x.shape for x in jax.tree.leaves(after)}
  for leaf in jax.tree.leaves(state.opt_state):
    assert leaf.ndim == 0 or leaf.shape in adapter_shapes, leaf.shape
  base_count = sum(x.size for x in jax.tree.leaves(before))
  assert lora_lib.count(after) < base_count / 5


def test_bench_memory_shows_optimizer_bytes_falling():
  full = config_lib.stage_config(_lora_config(rank=0))
  lora = config_lib.stage_config(_lora_config(rank=2, targets="q,v"))
  full_bytes = memory_bench.run(config=full)["optimizer_bytes_per_device"]
  lora_bytes = memory_bench.run(config=lora)["optimizer_bytes_per_device"]
  assert lora_bytes < full_bytes / 20, (lora_bytes, full_bytes)


def test_bad_lora_config_is_a_clear_error():
  c = _lora_config()
  c.init_from = ""
  with pytest.raises(UserError, match="init_from"):
    config_lib.stage_config(c)
  c = _lora_config(targets="q,query")
  with pytest.raises(UserError, match="model.lora.targets"):
    config_lib.stage_config(c)
  c = _lora_config()
  c.train.trainable = "top:1"
  with pytest.raises(UserError, match="train.trainable"):
    config_lib.stage_config(c)
  for tokens in ("chat,5", "5,5", "4,9999"):
    c = _lora_config()
    c.model.lora.train_tokens = tokens
    with pytest.raises(UserError, match="model.lora.train_tokens"):
      config_lib.stage_config(c)


def test_config_json_round_trips_the_lora_keys():
  config = config_lib.stage_config(_lora_config())
  again = config_lib.from_json(config_lib.to_json(config))
  assert again == config and json.loads(config_lib.to_json(config))["model"]["lora"]["rank"] == 4
  # A config.json from before model.lora.train_tokens: its adapters have no token rows.
  old = json.loads(config_lib.to_json(config))
  del old["model"]["lora"]["train_tokens"]
  assert config_lib.from_json(json.dumps(old)).lora.token_ids == ()


def test_a_run_pins_the_chat_tokens_of_its_tokenizer():
  """An imported tokenizer has its chat tokens elsewhere: "chat" is pinned to its ids."""

  class Imported:
    system_id, user_id, assistant_id, end_id = 380, 381, 382, 383

  lora = config_lib.stage_config(_lora_config()).lora
  assert lora.token_ids == (4, 5, 6, 7)  # gptjax's reserved layout until pinned.
  assert lora.pinned(Imported).train_tokens == "380,381,382,383"
  assert lora.pinned(Imported).pinned(Imported) == lora.pinned(Imported)
  assert dataclasses.replace(lora, rank=0).pinned(Imported).train_tokens == "chat"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, trained_workdir, tfds_data_dir):
  """(a LoRA workdir trained 4 steps on the trained base, its `merge`, merge's JSON, the
  base's checkpoint files with their times before the LoRA run)."""
  base_ckpt = os.path.join(trained_workdir, "checkpoints")
  base_files = {f: os.path.getmtime(os.path.join(base_ckpt, f)) for f in os.listdir(base_ckpt)}
  root = tmp_path_factory.mktemp("lora_run")
  whole, merged = root / "whole", root / "merged"
  run_stage(_lora_config(trained_workdir, tfds_data_dir), whole, mesh=make_mesh(data=2))
  out = gptjax("merge", "--workdir", whole, "--out", merged, "--json", check=True)
  return str(whole), str(merged), json.loads(out.stdout), base_files


@pytest.mark.slow
def test_lora_stage_trains_resumes_merges_and_serves(tmp_path, trained_workdir, tfds_data_dir,
                                                     lora_run):
  """A LoRA stage on a trained base: resume is exact, restores onto another mesh, the base
  workdir is untouched, and eval/sample on the LoRA workdir equal the merged workdir's."""
  config = _lora_config(trained_workdir, tfds_data_dir)
  whole, merged, merge_info, base_files = lora_run
  base_ckpt = os.path.join(trained_workdir, "checkpoints")
  split = tmp_path / "split"
  config.train.steps = 2
  run_stage(config, split, mesh=make_mesh(data=2))
  config.train.steps = 4
  run_stage(config, split, mesh=make_mesh(fsdp=2, tensor=2))  # Resumed on another mesh.
  stage = workdir_lib.read_config(whole)
  assert stage.init_from == trained_workdir and stage.lora.rank == 4
  assert stage.lora.train_tokens == "4,5,6,7"  # "chat", pinned to the tokenizer's ids.

  abstract = compile_programs(stage.replace(lora={"rank": 0}),
                              make_mesh(data=2)).abstract_state().params
  a = lora_lib.load_params(whole, 4, abstract)
  b = lora_lib.load_params(str(split), 4, abstract)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), a, b)
  base = lora_lib.load_params(trained_workdir, int(stage.init_from_step),
                              abstract)
  assert not np.array_equal(a["block_0"]["attn"]["qkv"], base["block_0"]["attn"]["qkv"])
  assert {f: os.path.getmtime(os.path.join(base_ckpt, f)) for f in os.listdir(base_ckpt)} \
      == base_files

  assert merge_info["step"] == 4
  assert workdir_lib.read_config(merged).lora.rank == 0
  lora_eval = evaluate_lib.eval_workdir(whole, mesh=make_mesh())
  merged_eval = evaluate_lib.eval_workdir(merged, mesh=make_mesh())
  assert lora_eval["loss"] == pytest.approx(merged_eval["loss"], rel=1e-6)
  assert gptjax("merge", "--workdir", whole, "--out", merged).returncode == 1  # Exists.

  sampling = generate_lib.Sampling(max_new_tokens=8, temperature=0.0)
  texts = []
  for path in (whole, merged):
    generator, tokenizer = generate_lib.load(path, mesh=make_mesh())
    texts.append(generator.generate([[tokenizer.bos_id, *tokenizer.encode("ROMEO:")]],
                                    sampling)[0].tokens)
  assert texts[0] == texts[1]


@pytest.mark.slow
def test_serve_and_export_hf_take_a_lora_workdir(lora_run, tmp_path):
  """The server answers from a LoRA workdir as from its merge, and export-hf writes the
  merged weights (the same tensors as exporting the merge)."""
  whole, merged, _, _ = lora_run
  replies, tensors = [], []
  for path in (whole, merged):
    app, _ = server_lib.build(path, max_batch=8)
    with server_lib.background(app) as url:
      response = httpx.post(url + "/v1/chat/completions", timeout=120, json={
          "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
          "temperature": 0})
    assert response.status_code == 200, response.text
    replies.append(response.json()["choices"][0]["message"]["content"])
    out = tmp_path / os.path.basename(path)
    exporter.export_hf(path, str(out))
    tensors.append(safetensors.numpy.load_file(out / "model.safetensors"))
  assert replies[0] == replies[1]
  assert tensors[0].keys() == tensors[1].keys()
  for name, value in tensors[0].items():
    np.testing.assert_array_equal(value, tensors[1][name], err_msg=name)


def test_changed_base_tokenizer_is_refused(tmp_path, trained_workdir):
  """The base reference is checked at load: another tokenizer in the base is an error."""
  import shutil

  base = tmp_path / "base"
  shutil.copytree(trained_workdir, base)
  lora_dir = tmp_path / "lora"
  os.makedirs(lora_dir)
  shutil.copy(workdir_lib.tokenizer_path(trained_workdir), workdir_lib.tokenizer_path(lora_dir))
  config = config_lib.stage_config(_lora_config(str(base))).replace(init_from_step="4")
  workdir_lib.atomic_write(workdir_lib.config_path(str(lora_dir)), config_lib.to_json(config))
  lora_lib.base_source(config, str(lora_dir))  # Fine as it is.
  with open(workdir_lib.tokenizer_path(str(base)), "ab") as f:
    f.write(b"\0")
  with pytest.raises(UserError, match="tokenizer of the LoRA base"):
    lora_lib.base_source(config, str(lora_dir))


def test_lora_classification_trains_the_adapters_and_a_new_head():
  c = _lora_config(rank=2, targets="q,v")
  c.data.kind = "classify"
  c.classify.labels = "a,b,c"
  config = config_lib.stage_config(c)
  mesh = make_mesh(data=2)
  programs = compile_programs(config, mesh)
  plain = compile_programs(config.replace(lora={"rank": 0}, data={"kind": "text"}), mesh)
  base = plain.init(jax.random.key(1)).params
  programs = programs.with_base(base)
  state = programs.init(jax.random.key(0))
  assert set(state.params) == {"block_0", "block_1", "classifier", lora_lib.TOKENS}
  head = jax.device_get(state.params["classifier"]["kernel"])
  batch = _batch()
  batch["targets"] = np.repeat(np.arange(8)[:, None] % 3, 32, axis=1).astype(np.int32)
  batch = sharding.global_batch(batch, programs.batch_sharding)
  for _ in range(2):
    state, metrics = programs.train_step(state, batch)
  assert "accuracy" in metrics
  assert not np.array_equal(jax.device_get(state.params["classifier"]["kernel"]), head)
  sums = programs.eval_step(state.params, batch)
  assert sums["confusion"].shape == (3, 3)


def test_dropout_drops_whole_input_features_of_the_adapter_path():
  config, programs, _, base = _programs_and_base(make_mesh())
  adapters = programs.init(jax.random.key(0)).params
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
                          adapters)
  lora = dataclasses.replace(config.lora, dropout=0.5)
  fold = functools.partial(lora_lib.merge, base, adapters)
  full = fold(config.lora)["block_0"]["mlp"]["wi"] - base["block_0"]["mlp"]["wi"]  # [D, F]
  dropped = fold(lora, rng=jax.random.key(5))["block_0"]["mlp"]["wi"] \
      - base["block_0"]["mlp"]["wi"]
  # Each input row of the delta is either gone or scaled by 1 / (1 - rate).
  kept = np.abs(np.asarray(dropped)).sum(1) > 0
  assert 0 < kept.sum() < len(kept)
  np.testing.assert_allclose(dropped[kept], 2 * full[kept], rtol=1e-4, atol=1e-6)
  # No rng (evaluation): no dropout.
  np.testing.assert_array_equal(fold(lora)["block_0"]["mlp"]["wi"],
                                fold(config.lora)["block_0"]["mlp"]["wi"])


@pytest.mark.parametrize("train_tokens", ["chat", ""])
def test_token_rows_learn_what_frozen_chat_embeddings_cannot(train_tokens):
  """A base whose chat-token rows all collapsed to one vector (as pretraining without chat
  tokens leaves them) cannot tell <|user|> from <|assistant|>: with identical inputs the
  adapters alone give both the same logits, so a task whose answer depends on which one came
  stays at log 2 or above. The token rows' delta separates them."""
  config, programs, _, base = _programs_and_base(make_mesh(), train_tokens=train_tokens,
                                                 steps=25)
  embedding = 20 * base["embedding"]  # A trained model's scale: the tied head can fit the task.
  base = {**base, "embedding": embedding.at[4:8].set(embedding[4])}
  programs = programs.with_base(base)
  batch = _batch(rows=8)
  at = 10
  marker = np.where(np.arange(8) % 2, 6, 5)  # <|assistant|> in odd rows, <|user|> in even.
  batch["inputs"] = np.repeat(batch["inputs"][:1], 8, axis=0)  # Identical but for the marker.
  batch["inputs"][:, at] = marker
  batch["targets"] = np.repeat(batch["targets"][:1], 8, axis=0)
  batch["targets"][:, at] = np.where(marker == 5, 100, 200)
  batch["weights"] = np.zeros_like(batch["weights"])
  batch["weights"][:, at] = 1.0
  state = programs.init(jax.random.key(0))
  batch = sharding.global_batch(batch, programs.batch_sharding)
  for _ in range(25):
    state, _ = programs.train_step(state, batch)
  loss = float(programs.eval_step(state.params, batch)["loss_sum"]) / 8
  logits = programs.model.apply({"params": lora_lib.merge(base, state.params, config.lora)},
                                batch["inputs"][:2])[:, at]
  if train_tokens:
    assert loss < 0.45, f"the chat tokens' rows should have learned the task (loss {loss})"
  else:
    np.testing.assert_array_equal(logits[0], logits[1])
    assert loss >= np.log(2) - 1e-4, f"identical inputs cannot beat log 2 (loss {loss})"
