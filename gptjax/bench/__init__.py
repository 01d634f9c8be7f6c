"""Benchmarks: `python -m gptjax bench KIND`, each printing one JSON object.

One module a benchmark (`decode`, `memory`, `serve`, `train`), the machine measurements
they compare against in `probes`, FLOP counts in `flops`, and the PyTorch reference step in
`torch_gpt`.
A benchmark module exposes `run(**flags) -> dict`; BENCHMARKS maps each command name to its
module, imported only when that benchmark runs. `gpu_check` (`python -m gptjax.bench.gpu_check`)
runs them, with their levers, as time-boxed subprocesses on one GPU. `stream_memory`
(`python -m gptjax.bench.stream_memory`) measures the text pipeline's peak host memory on a
synthetic multi-GB corpus, and `hf_import_memory` (`python -m gptjax.bench.hf_import_memory`)
that of `import-hf` on a synthetic ~1B-parameter Llama-family checkpoint.
"""

import importlib

BENCHMARKS = ("decode", "memory", "serve", "train")


def run(kind: str, **flags) -> dict:
  """Runs benchmark `kind` (one of BENCHMARKS) with the command line's flags."""
  return importlib.import_module(f"gptjax.bench.{kind}").run(**flags)
