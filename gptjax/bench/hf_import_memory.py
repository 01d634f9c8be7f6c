"""Peak host memory of `import-hf` on a synthetic ~1B-parameter Llama-family model.

  python -m gptjax.bench.hf_import_memory [--dir /tmp/hf_memory] [--dtype float32]

Writes a bfloat16 safetensors checkpoint of the shape below (values constant: memory, not
numerics, is measured), imports it with `python -m gptjax import-hf` in a child process and
prints the child's peak resident set size as JSON. The README quotes the number.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import tokenizers

from gptjax.hf import weights
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 16,
          "num_key_value_heads": 8, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "vocab_size": 32000, "tie_word_embeddings": False,
          "hidden_act": "silu", "eos_token_id": 0, "bos_token_id": 0}


def tensors(c):
  d, f, v, k = c["hidden_size"], c["intermediate_size"], c["vocab_size"], d_kv(c)
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
            "lm_head.weight": (v, d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (k, d),
                   p + "self_attn.v_proj.weight": (k, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)})
  bf16 = np.dtype(ml_dtypes.bfloat16)
  return [(n, s, bf16, lambda s=s: np.full(s, 0.01, bf16)) for n, s in shapes.items()]


def d_kv(c):
  return c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]


def write_tokenizer(folder: str):
  """A small byte-level BPE tokenizer (its size is not what is measured), eos id 0."""
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(["How can I help you today?", "I'd like to book a table."],
                              trainer)
  backend.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
               "bos_token": "<|endoftext|>"}, f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dir", default="/tmp/hf_memory")
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  src, out = os.path.join(args.dir, "src"), os.path.join(args.dir, "imported")
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(src)
  items = tensors(CONFIG)
  weights.write(src, items, max_shard_bytes=1 << 30)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(CONFIG, f)
  write_tokenizer(src)
  started = time.perf_counter()
  subprocess.run([sys.executable, "-m", "gptjax", "import-hf", "--model", src, "--workdir", out,
                  "--dtype", args.dtype], check=True)
  peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  params = sum(int(np.prod(s)) for _, s, _, _ in items)
  print(json.dumps({"parameters": params, "checkpoint_gib": round(params * 2 / 2**30, 2),
                    "import_dtype": args.dtype, "peak_rss_gib": round(peak_kib / 2**20, 2),
                    "params_in_import_dtype_gib": round(
                        params * np.dtype(args.dtype).itemsize / 2**30, 2),
                    "seconds": round(time.perf_counter() - started, 1)}))
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
