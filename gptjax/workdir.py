"""The run directory, a public contract:

  DIR/config.json       the resolved config (rebuilds the model for eval, sample and chat)
  DIR/tokenizer.model   the SentencePiece model
  DIR/checkpoints/      Orbax CheckpointManager, one folder a step
  DIR/metrics.jsonl     one JSON object a line (see gptjax/metrics.py)
  DIR/tensorboard/      TensorBoard event files
"""

import os

import jax
import ml_collections

from gptjax import config as config_lib
from gptjax import tokenizer as tokenizer_lib


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.model")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = config_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} is not a gptjax workdir (no config.json); pass the --workdir "
                     "of a `gptjax train` run.")
  with open(path) as f:
    return config_lib.from_json(f.read())


def atomic_write(path: str, data: str | bytes):
  """Writes via a temporary file and a rename: readers never see half a file."""
  tmp = path + ".tmp"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)


def check_compatible(config: ml_collections.ConfigDict, workdir: str):
  """Refuses a workdir whose existing run has another model shape."""
  if os.path.exists(config_path(workdir)):
    diffs = config_lib.model_shape_diff(read_config(workdir), config)
    if diffs:
      raise ValueError(f"Workdir {workdir} holds a run with another model shape "
                       f"({'; '.join(diffs)}); use a new --workdir or the same model config.")


def prepare(config: ml_collections.ConfigDict, workdir: str,
            training_texts=None) -> tokenizer_lib.Tokenizer:
  """Checks and writes DIR/config.json, and loads the tokenizer or trains it on the texts.

  Nothing is written when the existing run in `workdir` has another model shape.
  """
  check_compatible(config, workdir)
  path = tokenizer_path(workdir)
  trained = not os.path.exists(path)
  if trained:
    tokenizer = tokenizer_lib.train_tokenizer(
        training_texts, vocab_size=config.model.vocab_size,
        model_type=config.tokenizer.model_type, seed=config.train.seed,
        max_chars=config.tokenizer.max_chars)
  else:
    tokenizer = tokenizer_lib.Tokenizer.load(path)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(f"{path} has {tokenizer.vocab_size} tokens but model.vocab_size="
                     f"{config.model.vocab_size}; use a new --workdir or matching vocab_size.")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    if trained:
      tokenizer.save(path)
    atomic_write(config_path(workdir), config_lib.to_json(config))
  return tokenizer


def load_tokenizer(workdir: str) -> tokenizer_lib.Tokenizer:
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no tokenizer.model; pass the --workdir of a trained run.")
  return tokenizer_lib.Tokenizer.load(path)
