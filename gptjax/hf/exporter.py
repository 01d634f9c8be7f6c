"""`export-hf`: a checkpoint of a gptjax workdir -> a Hugging Face model directory.

Writes config.json, model.safetensors (shards and an index above 5 GB),
generation_config.json and the tokenizer files (tokenizer.json and a tokenizer_config.json
whose chat_template is gptjax's own), into a temporary sibling folder renamed at the end.
Configs with learned positions, LayerNorm and GELU export as GPT-2 (missing biases as zeros);
RoPE, RMSNorm and SwiGLU without dense biases as Llama (Qwen2 with q/k/v biases). Any other
mix (e.g. RoPE with LayerNorm, learned positions with SwiGLU, GQA with learned positions)
has no transformers architecture that computes it, and is refused saying why.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax import lora as lora_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.hf import gpt2, importer, llama, weights
from gptjax.hf import tokenizer as tok_lib
from gptjax.hf.table import param


def family_for(m: model_lib.ModelConfig):
  """The family module that computes gptjax model config `m`, or a UserError saying why none."""
  reasons = []
  for family in (gpt2, llama):
    reason = family.exportable(m)
    if reason is None:
      return family
    reasons.append(reason)
  raise UserError(f"this model (positions={m.positions}, norm={m.norm}, mlp={m.mlp}, "
                  f"use_bias={m.use_bias}) maps to no transformers architecture: "
                  f"{'; '.join(reasons)}.")


def restore_params(workdir: str, step, mesh=None):
  """(config, unscanned parameters) of checkpoint `step` of `workdir` (the latest falls back
  from a damaged one, as for every reader); a LoRA run's with its adapters folded into its
  base (the export holds merged weights)."""
  config = workdir_lib.read_config(workdir)
  mesh = mesh or sharding.make_mesh(config.mesh.sizes)
  shapes, shardings = importer.abstract_params(config, mesh)
  params, _ = lora_lib.load_checkpoint(workdir, step, ckpt_lib.abstract_like(shapes, shardings))
  if config.model.scan_layers:
    params = model_lib.unstack_layers(params)
  return config, params


def tensors(m: model_lib.ModelConfig, params, dtype):
  """(HF name, shape, dtype, fetch) for every tensor; each fetch pulls one parameter to the
  host. A GPT-2 bias gptjax does not have is zeros."""
  family = family_for(m)
  with_bias = dataclasses.replace(m, use_bias=True) if family is gpt2 else m
  shapes = importer.abstract_params(
      importer.stage_config(_model_keys(with_bias), "float32"),
      sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))[0]
  out = []
  for row in family.rows(m, biases=True):
    try:
      value = param(params, row.path)
    except KeyError:
      value = jax.ShapeDtypeStruct(param(shapes, row.path).shape, np.float32)

    def fetch(value=value, split=row.split):
      host = (np.zeros(value.shape, np.float32) if isinstance(value, jax.ShapeDtypeStruct)
              else np.asarray(jax.device_get(value)))
      return split(host)

    parts = jax.eval_shape(row.split, jax.ShapeDtypeStruct(value.shape, np.float32))
    for j, (name, part) in enumerate(zip(row.hf, parts)):
      out.append((name, part.shape, dtype, lambda fetch=fetch, j=j: fetch()[j]))
  return family, out


def _model_keys(m: model_lib.ModelConfig) -> dict:
  return {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
          if f.name not in ("dtype", "param_dtype", "scan_layers")}


def export_hf(workdir: str, out: str, *, step=None, dtype: str | None = None, mesh=None,
              max_shard_bytes: int = weights.MAX_SHARD_BYTES) -> str:
  """Writes checkpoint `step` (None: latest) of `workdir` to `out`; returns the architecture."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise UserError(f"--out {out} already exists; pass a new directory for the export.")
  config = workdir_lib.read_config(workdir)
  m = config.model
  family_for(m)  # Refuses before restoring anything.
  tokenizer = workdir_lib.load_tokenizer(workdir)
  config, params = restore_params(workdir, step, mesh)
  m = dataclasses.replace(config.model, scan_layers=False)
  dtype = np.dtype(importer.weights.DTYPES["BF16"] if (dtype or m.param_dtype) == "bfloat16"
                   else np.float32)
  family, items = tensors(m, params, dtype)
  hf_config = family.hf_config(m)
  ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
         "pad_token_id": tokenizer.pad_id}
  dtype_name = "bfloat16" if dtype != np.float32 else "float32"
  # transformers 5 reads `dtype`; earlier versions (and some servers) `torch_dtype`.
  hf_config.update(ids, dtype=dtype_name, torch_dtype=dtype_name)
  generation = {**ids, "eos_token_id": [tokenizer.end_id, tokenizer.eos_id],
                "max_length": m.max_len}

  tmp = f"{out}.exporting-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    weights.write(tmp, items, max_shard_bytes)
    files = {"config.json": json.dumps(hf_config, indent=2),
             "generation_config.json": json.dumps(generation, indent=2),
             **tok_lib.export_files(tokenizer, m.max_len)}
    for name, text in files.items():
      with open(os.path.join(tmp, name), "w") as f:
        f.write(text)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return hf_config["architectures"][0]
