"""Peak host memory of the text pipeline on a corpus larger than it should ever hold.

Writes a synthetic corpus of `--gb` GB as an array_record file (the format of prepared tfds
datasets, one text a record), then, in a fresh process, does what a pretraining stage does
with its data: trains the tokenizer on its bounded sample, counts the corpus' chunks
(TextChunks) and packs `--batches` train batches. It prints the peak resident memory of that
process (`ru_maxrss`), which stays far below the corpus size because documents stream:

  python -m gptjax.bench.stream_memory --gb 3 --batches 300
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_corpus(path: str, gigabytes: float, seed: int = 0) -> int:
  """Writes records of 1-8 random-word paragraphs until `gigabytes`; returns their count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  words = ["".join(rng.choice(list("etaoinshrdlucmfwyp"), size=rng.integers(1, 9)))
           for _ in range(5_000)]
  paragraphs = [" ".join(rng.choice(words, size=rng.integers(40, 400))) + ".\n\n"
                for _ in range(2_000)]
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
  written, count, goal = 0, 0, int(gigabytes * 1e9)
  while written < goal:
    picks = rng.integers(0, len(paragraphs), size=rng.integers(1, 9))
    record = "".join(paragraphs[i] for i in picks).encode()
    writer.write(record)
    written, count = written + len(record), count + 1
  writer.close()
  return count


def measure(path: str, batches: int, seq_len: int = 256, batch_size: int = 16) -> dict:
  """Tokenizer sample + chunk count + `batches` packed batches; seconds and peak RSS."""
  import grain  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

  from gptjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from gptjax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  source = array_record_data_source.ArrayRecordDataSource([path])
  texts = grain.MapDataset.source(source).map(lambda record: record.decode("utf-8"))
  times = {}
  start = time.perf_counter()
  chunks = data_lib.TextChunks(texts)
  times["count_chunks_s"] = time.perf_counter() - start
  start = time.perf_counter()
  sample = grain.MapDataset.source(chunks).shuffle(seed=0)
  tokenizer = tokenizer_lib.train_tokenizer((sample[i] for i in range(len(sample))),
                                            vocab_size=1024, max_chars=5_000_000)
  times["tokenizer_s"] = time.perf_counter() - start
  start = time.perf_counter()
  ds = data_lib.make_pretrain_dataset(chunks, tokenizer, seq_len=seq_len,
                                      batch_size=batch_size, seed=0)
  it = iter(ds)
  for _ in range(batches):
    next(it)
  times["batches_s"] = time.perf_counter() - start
  return {"corpus_gb": os.path.getsize(path) / 1e9, "records": len(source),
          "documents": len(chunks), "batches": batches, **times,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=3.0, help="corpus size to write")
  parser.add_argument("--batches", type=int, default=300, help="train batches to pack")
  parser.add_argument("--read", help="(internal) measure this corpus and print the result")
  args = parser.parse_args(argv)
  if args.read:
    for key, value in measure(args.read, args.batches).items():
      print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    return
  with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
    path = os.path.join(tmp, "corpus.array_record")
    start = time.perf_counter()
    count = write_corpus(path, args.gb)
    print(f"wrote {count} records, {os.path.getsize(path) / 1e9:.2f} GB in "
          f"{time.perf_counter() - start:.0f} s")
    # A fresh process, so its peak memory is the pipeline's alone.
    subprocess.run([sys.executable, "-m", "gptjax.bench.stream_memory", "--read", path,
                    "--batches", str(args.batches)], check=True)


if __name__ == "__main__":
  main()
