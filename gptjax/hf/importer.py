"""`import-hf`: a Hugging Face model directory -> a gptjax workdir at step 0.

The workdir is built in a temporary sibling folder and renamed into place at the end, so a
failure (an unsupported architecture, a missing or truncated weight file, a shape or
tokenizer that disagrees with config.json) leaves nothing at OUT. Weights stream one
parameter at a time: its Hugging Face tensors are read from the safetensors files, joined
and put onto the target mesh with the sharding the rules give it, before the next is read.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.hf import gpt2, llama, weights
from gptjax.hf import tokenizer as tok_lib

FAMILIES = {arch: family for family in (gpt2, llama) for arch in family.ARCHITECTURES}


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} is missing; expected {what}; pass a Hugging Face model "
                    "directory (huggingface-cli download NAME --local-dir DIR).") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e}); download the model again.") from None


def family_of(hf_config: dict):
  archs = hf_config.get("architectures") or [hf_config.get("model_type", "unknown")]
  family = FAMILIES.get(archs[0])
  if family is None:
    raise UserError(f"architecture {archs[0]} is not supported; expected one of "
                    f"{', '.join(FAMILIES)}.")
  return family


def _token(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir: str, hf_config: dict, rows: int):
  """(the gptjax tokenizer with chat tokens added, tokens before, tokens added)."""
  path = os.path.join(model_dir, "tokenizer.json")
  if not os.path.exists(path):
    raise UserError(f"{model_dir} has no tokenizer.json; expected the model's fast tokenizer "
                    "file beside config.json; download the complete model directory.")
  backend = tokenizers.Tokenizer.from_file(path)
  tok_config_path = os.path.join(model_dir, "tokenizer_config.json")
  tok_config = (_read_json(tok_config_path, "the tokenizer config")
                if os.path.exists(tok_config_path) else {})

  def named(key):
    token = _token(tok_config.get(f"{key}_token"))
    if token is None and hf_config.get(f"{key}_token_id") is not None:
      token = backend.id_to_token(hf_config[f"{key}_token_id"])
    return token

  eos = named("eos")
  if eos is None:
    raise UserError(f"{model_dir} names no eos token (tokenizer_config.json eos_token or "
                    "config.json eos_token_id); add one there.")
  bos, pad = named("bos") or eos, named("pad") or eos
  before = backend.get_vocab_size(with_added_tokens=True)
  if before > rows:
    raise UserError(f"the tokenizer has {before} tokens but the embedding has {rows} rows "
                    "(config.json vocab_size); the tokenizer does not belong to these weights.")
  added = tok_lib.add_chat_tokens(backend)
  vocab = tok_lib.padded_vocab_size(max(rows, backend.get_vocab_size(with_added_tokens=True)))
  return tok_lib.TokenizersTokenizer.build(backend, bos=bos, eos=eos, pad=pad,
                                           vocab_size=vocab), before, added


def stage_config(model: dict, dtype: str) -> config_lib.StageConfig:
  """The workdir's config: base defaults with the imported model's keys."""
  return config_lib.stage_config({
      "stage": workdir_lib.IMPORTED_STAGE,
      "model": {**model, "param_dtype": dtype, "dtype": dtype},
      "data": {"seq_len": min(256, model["max_len"])},
  })


def _grow_vocab(array, axis: int, known: int, added: int, size: int):
  """`array` grown to `size` rows along `axis`: the rows of the `added` chat tokens (ids
  known..) and the new padding rows hold the mean of the first `known` rows; the others are
  kept (so importing an export is exact)."""
  array = np.moveaxis(array, axis, 0)
  mean = array[:known].astype(np.float32).mean(0, keepdims=True).astype(array.dtype)
  grown = np.concatenate([array, np.repeat(mean, size - len(array), axis=0)])
  grown[known:known + added] = mean
  return np.moveaxis(grown, 0, axis)


def import_hf(model_dir: str, out: str, *, dtype: str = "float32", mesh=None) -> str:
  """Writes the workdir `out` from the Hugging Face model in `model_dir`; returns `out`."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise UserError(f"--workdir {out} already exists; pass a new directory for the import.")
  if dtype not in ("float32", "bfloat16"):
    raise UserError(f"--dtype={dtype} is not supported; expected float32 or bfloat16.")
  hf_config = _read_json(os.path.join(model_dir, "config.json"), "the model's config.json")
  family = family_of(hf_config)
  try:
    model = family.model_config(hf_config)
    rows = hf_config["vocab_size"]
  except KeyError as e:
    raise UserError(f"{model_dir}/config.json lacks {e.args[0]!r}; expected a complete "
                    f"{hf_config['architectures'][0]} config.") from None
  reader = weights.Reader(model_dir)
  tokenizer, known, added = load_tokenizer(model_dir, hf_config, rows)
  config = stage_config({**model, "vocab_size": tokenizer.vocab_size}, dtype)
  mesh = mesh or sharding.make_mesh(config.mesh.sizes)
  params = load_params(reader, family, config, (known, added), mesh)

  tmp = f"{out}.importing-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    tokenizer.save(workdir_lib.tokenizer_path(tmp))
    workdir_lib.atomic_write(workdir_lib.config_path(tmp), config_lib.to_json(config))
    with ckpt_lib.Checkpoints(workdir_lib.checkpoint_dir(tmp), max_to_keep=1) as checkpoints:
      checkpoints.save(0, {"params": params})
      checkpoints.wait()
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def abstract_params(config: config_lib.StageConfig, mesh):
  """(param shapes, their shardings on `mesh`), allocating nothing."""
  model = model_lib.Transformer(config.model)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, sharding.rules_tuple(config.mesh.rules))
  sharding.check_divisible(nn.unbox(boxed), shardings, mesh)
  return nn.unbox(boxed), shardings


def load_params(reader: weights.Reader, family, config: config_lib.StageConfig,
                vocab: tuple[int, int], mesh):
  """The parameters, one at a time from the files onto the mesh; `vocab` is (tokens the
  checkpoint knows, chat tokens added)."""
  m = config.model
  shapes, shardings = abstract_params(config, mesh)
  flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
  available = {family.hf_name(n): n for n in reader.names()}
  table = family.rows(m, biases=m.use_bias)
  missing = sorted(n for r in table for n in r.hf if n not in available)
  if missing:
    raise UserError(f"the weights lack {missing[0]} ({len(missing)} tensors missing) that "
                    "config.json implies; the files do not match config.json: download the "
                    "model again.")
  used = {n for r in table for n in r.hf}
  extra = sorted(n for n in available if n not in used
                 and not any(n.endswith(s) for s in family.IGNORED)
                 and not (n == "lm_head.weight" and m.tie_embeddings))
  if extra:
    raise UserError(f"the weights hold {extra[0]} ({len(extra)} unexpected tensors), which "
                    f"{config.model} does not use; the checkpoint has features gptjax does not "
                    "compute.")
  params = {}
  for row in table:
    key = tuple(jax.tree_util.DictKey(k) for k in row.path)
    target = flat_shapes[key]
    sources = [reader.get(available[n]) for n in row.hf]
    try:
      value = row.join(*sources)
    except ValueError:
      value = None
    if value is not None and row.vocab_axis is not None:
      value = _grow_vocab(value, row.vocab_axis, *vocab, target.shape[row.vocab_axis])
    if value is None or value.shape != target.shape:
      raise UserError(f"{', '.join(row.hf)} has shape "
                      f"{' / '.join(str(s.shape) for s in sources)}, which disagrees with "
                      f"config.json (gptjax expects {target.shape} for "
                      f"{'/'.join(row.path)}); the weights do not match the config.")
    node = params
    for k in row.path[:-1]:
      node = node.setdefault(k, {})
    node[row.path[-1]] = jax.device_put(value.astype(target.dtype),
                                        _at(shardings, row.path))
    del sources, value
  return params


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree
