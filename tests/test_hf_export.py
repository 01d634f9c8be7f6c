"""`export-hf`: round trips, the names and shapes transformers expects, and (where transformers
is installed) the third leg of the parity: the export in transformers gives gptjax's logits
and chat-template ids. The first two legs (training forward, KV-cached decoding) are in
tests/test_hf_import.py."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from conftest import gptjax
from test_hf_import import FAMILIES, GOLDENS, imported  # noqa: F401  (a fixture)
from test_robust_damage import damage

from gptjax import config as config_lib
from gptjax import dialogue, generate
from gptjax import workdir as workdir_lib
from gptjax.hf import exporter, importer, weights

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("transformers", "torch"))
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers and torch are not installed (they are optional: "
    "pip install transformers torch to run the transformers leg of the parity)")
IDS = [5, 17, 42, 99, 7, 150, 3, 64, 211, 12]
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
     {"role": "assistant", "content": "hello, how can I help?"},
     {"role": "user", "content": "a refund, please"}],
    [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "jumps"},
     {"role": "user", "content": "over the dog"}, {"role": "assistant", "content": "lazy"}],
]


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):  # noqa: F811
  root = tmp_path_factory.mktemp("exported")
  for name in FAMILIES:
    exporter.export_hf(imported[name], str(root / name))
  return {name: str(root / name) for name in FAMILIES}


def _logits(workdir, ids=IDS):
  generator, _tokenizer = generate.load(workdir)
  return np.asarray(generator.model.apply({"params": generator.params}, jnp.asarray([ids]))[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_import_export_import_is_bit_identical(imported, exported, name, tmp_path):  # noqa: F811
  again = importer.import_hf(exported[name], str(tmp_path / "again"))
  a, tok_a = generate.load(imported[name])
  b, tok_b = generate.load(again)
  assert tok_a.model_bytes == tok_b.model_bytes
  assert workdir_lib.read_config(imported[name]) == workdir_lib.read_config(again)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a.params, b.params)


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_names_shapes_and_config_are_those_transformers_wrote(exported, name):
  theirs, ours = weights.Reader(os.path.join(GOLDENS, name)), weights.Reader(exported[name])
  assert sorted(ours.names()) == sorted(theirs.names())
  # The safetensors library reads what gptjax wrote (gptjax reads and writes the format itself).
  loaded = safetensors.numpy.load_file(os.path.join(exported[name], "model.safetensors"))
  assert {n: v.shape for n, v in loaded.items()} == {n: ours.shape(n) for n in ours.names()}
  for n in ours.names():
    # The vocabulary axis is padded (and holds the chat tokens); every other axis agrees.
    assert [a for a, b in zip(ours.shape(n), theirs.shape(n)) if a != b] in ([], [384])
  with open(os.path.join(GOLDENS, name, "config.json")) as f:
    golden = json.load(f)
  with open(os.path.join(exported[name], "config.json")) as f:
    config = json.load(f)
  shared = set(config) & set(golden) - {"vocab_size", "bos_token_id", "eos_token_id",
                                        "pad_token_id", "transformers_version", "n_ctx",
                                        "resid_pdrop", "embd_pdrop", "attn_pdrop"}
  assert {k: config[k] for k in shared} == {k: golden[k] for k in shared}
  assert config["vocab_size"] == 384
  assert sorted(os.listdir(exported[name])) == [
      "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
      "tokenizer_config.json"]


def test_large_exports_are_sharded_with_an_index_and_import_back(imported, tmp_path):  # noqa: F811
  out = tmp_path / "sharded"
  exporter.export_hf(imported["llama_gqa_untied"], str(out), max_shard_bytes=50_000)
  shards = sorted(p for p in os.listdir(out) if p.startswith("model-"))
  assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
  again = importer.import_hf(str(out), str(tmp_path / "again"))
  np.testing.assert_array_equal(_logits(again), _logits(imported["llama_gqa_untied"]))


def test_exported_tokenizer_json_encodes_like_gptjax(imported, exported):  # noqa: F811
  tokenizer = workdir_lib.load_tokenizer(imported["gpt2"])
  backend = tokenizers.Tokenizer.from_file(os.path.join(exported["gpt2"], "tokenizer.json"))
  for text in ("The quick brown fox.", "refund <|user|> policy", " two  spaces\nnewline"):
    assert backend.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)


def test_unexportable_configs_are_refused_saying_why(tmp_path):
  config = config_lib.stage_config({"model": {"positions": "rope", "norm": "layernorm"}})
  workdir_lib.atomic_write(workdir_lib.config_path(str(tmp_path)), config_lib.to_json(config))
  with pytest.raises(ValueError, match="maps to no transformers architecture: GPT-2 needs "
                     "learned positions, LayerNorm and GELU; the Llama family needs RoPE"):
    exporter.export_hf(str(tmp_path), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_trained_sentencepiece_workdir_exports_a_tokenizer_that_encodes_alike(
    trained_workdir, tmp_path):
  out = tmp_path / "hf"
  result = gptjax("export-hf", "--workdir", trained_workdir, "--out", out)
  assert result.returncode == 0, result.stderr
  assert "as GPT2LMHeadModel" in result.stdout
  tokenizer = workdir_lib.load_tokenizer(trained_workdir)
  backend = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  for text in ("First Citizen:\nBefore we proceed any further, hear me speak.",
               "  odd   spacing and unseen ž characters", "<|user|> hi"):
    assert backend.encode(text, add_special_tokens=False).ids == tokenizer.encode(text), text
    assert backend.decode(tokenizer.encode(text), skip_special_tokens=False) == text
  again = gptjax("export-hf", "--workdir", trained_workdir, "--out", out)
  assert again.returncode == 1 and "already exists" in again.stderr


def test_a_damaged_latest_step_exports_the_previous_one_and_a_named_one_is_an_error(
    trained_workdir, tmp_path, capfd):
  from gptjax import checkpoint as ckpt_lib

  run = str(shutil.copytree(trained_workdir, tmp_path / "run"))  # Checkpoints 2 and 4.
  damage(os.path.join(run, "checkpoints", "4"), "truncated_arrays")
  exporter.export_hf(run, str(tmp_path / "latest"))
  err = capfd.readouterr().err
  assert "checkpoint 4" in err and "is damaged" in err and "using the previous one" in err
  exporter.export_hf(run, str(tmp_path / "two"), step="2")
  with open(tmp_path / "latest" / "model.safetensors", "rb") as a, \
       open(tmp_path / "two" / "model.safetensors", "rb") as b:
    assert a.read() == b.read(), "the latest export is not checkpoint 2's"
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="Checkpoint 4 .* is damaged"):
    exporter.export_hf(run, str(tmp_path / "four"), step="4")
  assert not (tmp_path / "four").exists()


# ----------------------------------------------------------------------------- transformers


def _hf(directory):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  return model, tokenizer, torch


def _template_ids(hf_tokenizer, messages, add_generation_prompt):
  ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=True)
  return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_runs_the_export_like_gptjax(imported, exported, name):  # noqa: F811
  model, hf_tokenizer, torch = _hf(exported[name])
  with torch.no_grad():
    theirs = model(torch.tensor([IDS])).logits[0].numpy()
  np.testing.assert_allclose(theirs, _logits(imported[name]), atol=2e-4, rtol=1e-4)
  tokenizer = workdir_lib.load_tokenizer(imported[name])
  for messages in CONVERSATIONS:
    assert (_template_ids(hf_tokenizer, messages, True)
            == dialogue.render_prompt(messages, tokenizer))
    assert (_template_ids(hf_tokenizer, messages, False)
            == dialogue.render(messages, tokenizer).tokens.tolist())


@needs_transformers
def test_transformers_loads_a_trained_gptjax_model_and_its_sentencepiece_tokenizer(
    trained_workdir, tmp_path):
  out = tmp_path / "hf"
  exporter.export_hf(trained_workdir, str(out))
  model, hf_tokenizer, torch = _hf(str(out))
  tokenizer = workdir_lib.load_tokenizer(trained_workdir)
  text = "First Citizen:\nBefore we proceed, hear me speak."
  assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
  ids = [tokenizer.bos_id, *tokenizer.encode(text)]
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(theirs, _logits(trained_workdir, ids), atol=2e-4, rtol=1e-4)
  for messages in CONVERSATIONS:
    assert (_template_ids(hf_tokenizer, messages, True)
            == dialogue.render_prompt(messages, tokenizer))


def test_a_scan_layers_workdir_exports_the_same_files(imported, exported, tmp_path):  # noqa: F811
  from gptjax import checkpoint as ckpt_lib
  from gptjax import config as config_lib

  name = "llama_gqa_untied"
  generator, _ = generate.load(imported[name])
  params = dict(generator.params)
  blocks = [params.pop(f"block_{i}") for i in range(2)]
  params["blocks"] = jax.tree.map(lambda *x: jnp.stack(x), *blocks)
  config = workdir_lib.read_config(imported[name])
  scanned = str(tmp_path / "scanned")
  os.makedirs(scanned)
  workdir_lib.atomic_write(workdir_lib.config_path(scanned), config_lib.to_json(
      config.replace(model={"scan_layers": True})))
  workdir_lib.atomic_write(workdir_lib.tokenizer_path(scanned),
                           workdir_lib.load_tokenizer(imported[name]).model_bytes)
  checkpoints = ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(scanned))
  checkpoints.save(0, {"params": params})
  checkpoints.wait()
  checkpoints.close()
  exporter.export_hf(scanned, str(tmp_path / "out"))
  for file_name in ("model.safetensors", "config.json", "tokenizer.json"):
    with open(tmp_path / "out" / file_name, "rb") as a, \
         open(os.path.join(exported[name], file_name), "rb") as b:
      assert a.read() == b.read(), file_name
