"""`import-hf`: the committed goldens (tests/make_hf_goldens.py) imported and matched against
transformers' logits and greedy continuations, their tokenizers, and every import error."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, gptjax, make_mesh

from gptjax import dialogue, generate
from gptjax import model as model_lib
from gptjax import tokenizer as sp_lib
from gptjax import workdir as workdir_lib
from gptjax.hf import importer

GOLDENS = os.path.join(ROOT, "tests", "hf_goldens")
FAMILIES = ("gpt2", "llama_gqa_untied", "llama_tied", "qwen2")
GREEDY = generate.Sampling(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """family -> an imported workdir of its golden."""
  root = tmp_path_factory.mktemp("imported")
  return {name: importer.import_hf(os.path.join(GOLDENS, name), str(root / name))
          for name in FAMILIES}


def golden(name):
  return np.load(os.path.join(GOLDENS, name, "golden.npz"))


def cached_logits(model, params, ids):
  """Logits of `ids` fed through the KV cache: a prefill of 3, then one token a call."""
  cache = model_lib.init_cache(model.cfg, jnp.array([0]), ids.shape[1])
  out = []
  for lo, hi in [(0, 3)] + [(c, c + 1) for c in range(3, ids.shape[1])]:
    logits, cache = model.apply({"params": params}, ids[:, lo:hi], cache=cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_imported_model_matches_transformers_logits_cached_logits_and_greedy(imported, name):
  g = golden(name)
  generator, _ = generate.load(imported[name], stop_ids=())
  ids = jnp.asarray(g["ids"])[None]
  logits = generator.model.apply({"params": generator.params}, ids)[0]
  # Training forward pass == transformers, on the tokenizer's 300 ids (qwen2's rows past them
  # were untrained padding; the import sets them, and the chat tokens', to the mean row).
  np.testing.assert_allclose(logits[:, :300], g["logits"][:, :300], atol=2e-4, rtol=1e-4)
  # KV-cached decoding == the training forward pass.
  np.testing.assert_allclose(cached_logits(generator.model, generator.params, ids)[0], logits,
                             atol=2e-5, rtol=1e-5)
  [completion] = generator.generate([g["ids"].tolist()], GREEDY)
  assert completion.tokens == g["greedy"].tolist()


def test_config_carries_the_families_features(imported):
  configs = {n: workdir_lib.read_config(imported[n]).model for n in FAMILIES}
  assert (configs["gpt2"].positions, configs["gpt2"].use_bias) == ("learned", True)
  assert configs["llama_gqa_untied"].num_kv_heads == 2
  assert not configs["llama_gqa_untied"].tie_embeddings
  assert configs["llama_gqa_untied"].rope_theta == 500.0
  assert configs["qwen2"].qkv_bias and configs["qwen2"].num_kv_heads == 1
  assert configs["llama_tied"].norm_eps == 1e-6
  # Vocabularies padded to a multiple of 128 that holds the added chat tokens.
  assert {c.vocab_size for c in configs.values()} == {384}


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_chat_tokens_are_added_special_tokens_whose_rows_are_the_mean(imported, name):
  tokenizer = workdir_lib.load_tokenizer(imported[name])
  assert [tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id,
          tokenizer.end_id] == [300, 301, 302, 303]
  assert tokenizer.eos_id == tokenizer.bos_id == 0 and tokenizer.vocab_size == 384
  generator, _ = generate.load(imported[name])
  embedding = np.asarray(generator.params["embedding"])
  mean = embedding[:300].mean(0)
  # The chat tokens' rows and the new padding rows hold the mean; qwen2's own rows past its
  # tokenizer (300..319, in its checkpoint) are kept, so importing an export is exact.
  new_rows = [*range(300, 304), *range(320 if name == "qwen2" else 304, 384)]
  np.testing.assert_allclose(embedding[new_rows], np.broadcast_to(mean, (len(new_rows), 32)),
                             atol=1e-6)
  assert generator.stop_ids == (303, 0)


def test_literal_chat_tokens_in_text_stay_text_and_the_template_renders(imported):
  tokenizer = workdir_lib.load_tokenizer(imported["llama_tied"])
  text = "hi <|user|> and <|endoftext|> there"
  plain = tokenizer.encode(text, chat_tokens=False)
  assert not set(plain) & {0, 300, 301, 302, 303}
  assert tokenizer.decode(plain) == text
  assert tokenizer.user_id in tokenizer.encode(text)
  messages = [{"role": "user", "content": "refund?"}, {"role": "assistant", "content": "yes"}]
  tokens = dialogue.render(messages, tokenizer).tokens.tolist()
  assert tokens[:2] == [0, 301] and tokens[-2:] == [303, 0]
  assert tokenizer.decode(tokens) == "<|endoftext|><|user|>refund?<|end|><|assistant|>yes<|end|><|endoftext|>"
  # Padding rows decode to nothing; ids past the model's rows are an error.
  assert tokenizer.decode([350]) == ""
  with pytest.raises(ValueError, match="out of range"):
    tokenizer.decode([384])


def test_imported_tokenizer_pickles_and_loads_through_the_one_interface(imported):
  import pickle
  path = workdir_lib.tokenizer_path(imported["gpt2"])
  tokenizer = sp_lib.Tokenizer.load(path)
  again = pickle.loads(pickle.dumps(tokenizer))
  assert again.model_bytes == tokenizer.model_bytes
  assert again.encode("the fox") == tokenizer.encode("the fox")


def test_imported_checkpoint_restores_onto_another_mesh(imported):
  name = "llama_gqa_untied"
  ids = jnp.asarray(golden(name)["ids"])[None]
  one, _ = generate.load(imported[name], mesh=make_mesh(data=8))
  other, _ = generate.load(imported[name], mesh=make_mesh(data=2, fsdp=2, tensor=2))
  assert tuple(other.params["embedding"].sharding.spec) == ("tensor", "fsdp")
  np.testing.assert_allclose(other.model.apply({"params": other.params}, ids),
                             one.model.apply({"params": one.params}, ids), atol=1e-5)


# ----------------------------------------------------------------------------- errors


def _copy(name, tmp_path):
  target = tmp_path / f"{name}_copy"
  shutil.copytree(os.path.join(GOLDENS, name), target)
  return target


def _edit_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  with open(path, "w") as f:
    json.dump(data, f)


def _refused(model_dir, tmp_path, match):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match) as error:
    importer.import_hf(str(model_dir), str(out))
  assert "\n" not in str(error.value)
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if "importing" in p]


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
  model_dir = _copy("gpt2", tmp_path)
  _edit_json(model_dir / "config.json", architectures=["BertForMaskedLM"])
  _refused(model_dir, tmp_path, "BertForMaskedLM is not supported; expected one of "
           "GPT2LMHeadModel, LlamaForCausalLM")


def test_missing_weight_file_is_one_line(tmp_path):
  model_dir = _copy("gpt2", tmp_path)
  os.remove(model_dir / "model.safetensors")
  _refused(model_dir, tmp_path, "has neither model.safetensors")


def test_missing_shard_is_one_line(tmp_path):
  model_dir = _copy("gpt2", tmp_path)
  os.rename(model_dir / "model.safetensors", model_dir / "model-00001-of-00002.safetensors")
  with open(model_dir / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                              "b": "model-00002-of-00002.safetensors"}}, f)
  _refused(model_dir, tmp_path, "model-00002-of-00002.safetensors is missing")


def test_truncated_weight_file_is_one_line(tmp_path):
  model_dir = _copy("llama_tied", tmp_path)
  path = model_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 1000])
  _refused(model_dir, tmp_path, "is truncated")


def test_shape_that_disagrees_with_config_is_one_line(tmp_path):
  model_dir = _copy("llama_gqa_untied", tmp_path)
  _edit_json(model_dir / "config.json", intermediate_size=128)
  _refused(model_dir, tmp_path, "disagrees with config.json")


def test_tokenizer_larger_than_the_embedding_is_one_line(tmp_path):
  model_dir = _copy("gpt2", tmp_path)
  _edit_json(model_dir / "config.json", vocab_size=200)
  _refused(model_dir, tmp_path, "the tokenizer has 300 tokens but the embedding has 200 rows")


def test_missing_tokenizer_and_unsupported_rope_scaling_are_one_line(tmp_path):
  model_dir = _copy("llama_tied", tmp_path)
  os.remove(model_dir / "tokenizer.json")
  _refused(model_dir, tmp_path, "has no tokenizer.json")
  model_dir = _copy("qwen2", tmp_path)
  _edit_json(model_dir / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0})
  _refused(model_dir, tmp_path, "RoPE scaling 'yarn' is not supported")


def test_existing_workdir_is_refused(tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(ValueError, match="already exists"):
    importer.import_hf(os.path.join(GOLDENS, "gpt2"), str(tmp_path / "out"))


def test_import_command_writes_a_workdir_and_says_so(tmp_path):
  out = tmp_path / "w"
  result = gptjax("import-hf", "--model", os.path.join(GOLDENS, "qwen2"), "--workdir", str(out))
  assert result.returncode == 0, result.stderr
  assert "Imported Qwen2ForCausalLM" in result.stdout
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "tokenizer.model"]
  bad = gptjax("import-hf", "--model", str(tmp_path / "nope"), "--workdir", str(tmp_path / "x"))
  assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0, bad.stderr


def test_training_on_the_imported_workdir_itself_is_refused_and_writes_nothing(imported):
  workdir = imported["gpt2"]
  before = sorted(os.listdir(workdir))
  config = workdir_lib.read_config(workdir).replace(stage="dialogue")
  with pytest.raises(ValueError, match="holds an imported model.*--config.init_from="):
    workdir_lib.resolve(config, workdir)
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.slow
def test_dialogue_stage_from_an_imported_model_trains_and_chats(imported, tmp_path):
  import runpy

  from conftest import run_stage, write_chats

  from gptjax import metrics as metrics_lib

  config = runpy.run_path(os.path.join(ROOT, "experiments", "hf_dialogue.py"))["get_config"](
      imported["llama_gqa_untied"])
  config.data.update(train_files=write_chats(tmp_path / "chats.jsonl", 40),
                     eval_files=write_chats(tmp_path / "dev.jsonl", 8, 1), eval_batches=2)
  config.train.update(steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=1,
                      log_every=1, eval_every=6, checkpoint_every=6)
  workdir = tmp_path / "dialogue"
  run_stage(config, workdir, mesh=make_mesh(data=2))
  rows = [r for r in metrics_lib.read_rows(str(workdir / "metrics.jsonl"))
          if r["split"] == "train"]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
  result = gptjax("chat", "--workdir", workdir, "--message", "I need a hotel in Paris.",
                  "--temperature", "0", "--max_new_tokens", "8")
  assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_mistral_style_config_reads_like_llama_within_its_window():
  from gptjax.hf import llama

  with open(os.path.join(GOLDENS, "llama_gqa_untied", "config.json")) as f:
    config = json.load(f)
  mistral = {**config, "architectures": ["MistralForCausalLM"], "sliding_window": 32,
             "rope_theta": 1e6, "rope_parameters": None}
  assert importer.family_of(mistral) is llama
  keys = llama.model_config(mistral)
  assert (keys["max_len"], keys["rope_theta"], keys["num_kv_heads"]) == (32, 1e6, 2)
  assert not keys["qkv_bias"]


def test_bfloat16_import_stores_bfloat16_and_stays_close(tmp_path):
  workdir = importer.import_hf(os.path.join(GOLDENS, "llama_tied"), str(tmp_path / "bf16"),
                               dtype="bfloat16")
  generator, _ = generate.load(workdir)
  assert generator.params["embedding"].dtype == jnp.bfloat16
  g = golden("llama_tied")
  logits = generator.model.apply({"params": generator.params}, jnp.asarray(g["ids"])[None])[0]
  np.testing.assert_allclose(logits[:, :300], g["logits"], atol=0.25)


def test_sample_runs_on_an_imported_workdir(imported):
  result = gptjax("sample", "--workdir", imported["gpt2"], "--prompt", "The quick",
                  "--max_new_tokens", "4", "--temperature", "0", "--json")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.splitlines()[-1])["tokens"] <= 4
