"""The peer for `bench decode`: Hugging Face transformers' `generate` on the same model and CPU.

`bench decode` writes the generator's weights as a transformers model (gptjax/hf/exporter.py,
float32) into a temporary folder and runs this file in a subprocess, before its own timings
(so the two frameworks' thread pools never compete for the cores):

  python -m gptjax.bench.hf_generate --model DIR --batch_sizes 1,8 --prompt_len 64 \
      --new_tokens 128 [--repeats 3]

It prints one JSON object: per batch size, the best of `repeats` greedy generations of
`new_tokens` tokens (never stopping early) and of 1 token (the prefill and the first token);
their difference is the decode time, as `bench decode` reports its own. Prompts are random
tokens from numpy's generator seeded 0 (`prompts`), row 0's new tokens are reported. Needs torch and
transformers (`pip install -e .[bench]`), never a runtime dependency.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from gptjax.bench import probes


def prompts(vocab: int, batch: int, prompt_len: int) -> np.ndarray:
  """The timed prompts: [batch, prompt_len] random ids, the same for a given shape."""
  return np.random.default_rng(0).integers(16, vocab, size=(batch, prompt_len))


def measure(model_dir: str, batch_sizes, prompt_len: int, new_tokens: int,
            repeats: int) -> dict:
  """{"results": [{batch, decode_tokens_per_sec, ...}]} of transformers' greedy generate."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  results = []
  for batch in batch_sizes:
    ids = torch.from_numpy(prompts(model.config.vocab_size, batch, prompt_len))

    def generate(n: int, ids=ids):
      with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)

    generate(2)  # Warm-up.
    first_s = probes.best_seconds(lambda: generate(1), repeats)
    all_s = probes.best_seconds(lambda: generate(new_tokens), repeats)
    results.append({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                    # Row 0's tokens, to check that the peer runs the same model.
                    "row0_tokens": generate(new_tokens)[0, prompt_len:].tolist(),
                    "generate_s": round(all_s, 4),
                    "decode_tokens_per_sec": round(batch * (new_tokens - 1)
                                                   / max(all_s - first_s, 1e-9), 1)})
  return {"framework": "transformers", "version": transformers.__version__,
          "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}


def peer(generator, batch_sizes, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
  """transformers' generate on `generator`'s model and weights (measure(), in a subprocess),
  or {"skipped": why}."""
  # pylint: disable=import-outside-toplevel
  import dataclasses

  import jax

  from gptjax.errors import UserError
  from gptjax.hf import exporter, weights
  try:
    import torch  # noqa: F401  pylint: disable=unused-import
    import transformers  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    return {"skipped": "torch and transformers are not installed (pip install -e .[bench])"}
  if jax.process_count() > 1 or jax.devices()[0].platform != "cpu":
    return {"skipped": "the transformers peer runs on one CPU host only"}
  m = dataclasses.replace(generator.model.cfg, scan_layers=False,
                          tie_embeddings=generator.model.cfg.tie_embeddings
                          or generator.head_copy)
  params = {k: v for k, v in generator.params.items()
            if not (generator.head_copy and k == "head")}
  try:
    family, items = exporter.tensors(m, params, np.float32)
  except UserError as e:
    return {"skipped": f"no transformers architecture for this model: {e}"}
  folder = tempfile.mkdtemp(prefix="gptjax-hf-peer-")
  try:
    weights.write(folder, items)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump({**family.hf_config(m), "dtype": "float32", "torch_dtype": "float32"}, f)
    out = subprocess.run(
        [sys.executable, "-m", "gptjax.bench.hf_generate", "--model", folder,
         "--batch_sizes", ",".join(map(str, batch_sizes)), f"--prompt_len={prompt_len}",
         f"--new_tokens={new_tokens}", f"--repeats={repeats}"],
        capture_output=True, text=True, timeout=3600, check=False)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  if out.returncode:
    return {"skipped": f"gptjax.bench.hf_generate failed: {out.stderr.strip()[-300:]}"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True)
  parser.add_argument("--batch_sizes", default="1,8")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  a = parser.parse_args()
  print(json.dumps(measure(a.model, [int(b) for b in a.batch_sizes.split(",")], a.prompt_len,
                           a.new_tokens, a.repeats)))


if __name__ == "__main__":
  main()
