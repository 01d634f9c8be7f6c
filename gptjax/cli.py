"""Command line: `python -m gptjax COMMAND [flags]` (also installed as `gptjax`).

  train    --config experiments/NAME.py --workdir DIR [--config.KEY=VALUE ...]
           Trains one stage; rerun on the same DIR to resume from its latest checkpoint.
  prepare  --dataset NAME [--data_dir DIR]
           Downloads and prepares a tfds catalog dataset as array_record (needs tensorflow-cpu).

Config overrides follow ml_collections: an unknown key or a value of the wrong type is an
error naming the key, and nothing starts.
"""

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file defining get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config.json, tokenizer.model, checkpoints/, metrics.jsonl.")
_DATASET = flags.DEFINE_string("dataset", None, "prepare: tfds catalog name, e.g. tiny_shakespeare.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "prepare: tfds data_dir to write to (default: TFDS_DATA_DIR or tfds' own).")


class UsageError(ValueError):
  """A command was called without what it needs."""


def _require(flag, name: str, command: str):
  if flag.value is None:
    raise UsageError(f"`{command}` needs --{name}; see `python -m gptjax --help`.")
  return flag.value


def cmd_train():
  """Trains the configured stage in --workdir."""
  from gptjax import train as train_lib  # Deferred: keeps `--help` and `prepare` light.

  config = _require(_CONFIG, "config", "train")
  workdir = _require(_WORKDIR, "workdir", "train")
  start = time.time()
  result = train_lib.train(config, workdir)
  step = int(result.state.step)
  line = f"Done: {config.stage} at step {step} in {time.time() - start:.0f}s"
  if result.last_train:
    line += f"; train loss {result.last_train['loss']:.4f}"
  if result.last_eval:
    line += (f"; eval loss {result.last_eval['loss']:.4f} "
             f"(perplexity {result.last_eval['perplexity']:.2f})")
  print(f"{line}. Checkpoints in {workdir}/checkpoints, metrics in {workdir}/metrics.jsonl.")


def cmd_prepare():
  """Prepares a tfds catalog dataset in array_record format (needs TensorFlow)."""
  name = _require(_DATASET, "dataset", "prepare")
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise UsageError("`prepare` needs TensorFlow to build tfds datasets; install it with "
                     "`pip install tensorflow-cpu`.") from None
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=_DATA_DIR.value, file_format="array_record")
  builder.download_and_prepare()
  print(f"Prepared {name} {builder.info.version} in {builder.data_dir}: "
        + ", ".join(f"{s} {v.num_examples}" for s, v in builder.info.splits.items()))


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare}


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax and tfds chatter at INFO and WARNING.
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Expected one command out of {', '.join(COMMANDS)}; got {argv[1:]}.")
  from gptjax.train import NonFiniteLossError  # pylint: disable=g-import-not-at-top

  try:
    COMMANDS[argv[1]]()
  except (ValueError, NonFiniteLossError) as e:
    # User-facing problems (bad config, missing dataset, diverged loss) as one line, no trace.
    print(f"gptjax {argv[1]}: error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main)
