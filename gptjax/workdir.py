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
  """Checks and writes DIR/config.json, and loads the tokenizer or trains it.

  `training_texts` is called for the texts only when there is no tokenizer yet.

  Nothing is written when the existing run in `workdir` has another model shape.
  """
  check_compatible(config, workdir)
  path = tokenizer_path(workdir)
  trained = not os.path.exists(path)
  if trained:
    tokenizer = new_tokenizer(config, training_texts())
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


def new_tokenizer(config: ml_collections.ConfigDict, texts) -> tokenizer_lib.Tokenizer:
  """A tokenizer trained on `texts` with the config's vocab size and tokenizer settings."""
  return tokenizer_lib.train_tokenizer(
      texts, vocab_size=config.model.vocab_size, model_type=config.tokenizer.model_type,
      seed=config.train.seed, max_chars=config.tokenizer.max_chars)


def load_tokenizer(workdir: str) -> tokenizer_lib.Tokenizer:
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no tokenizer.model; pass the --workdir of a trained run.")
  return tokenizer_lib.Tokenizer.load(path)


def resolve_init_from(config: ml_collections.ConfigDict, workdir: str):
  """Prepares a fresh stage started from `config.init_from` (an earlier stage's workdir).

  Refuses, naming the difference, a source with another model shape or a tokenizer other
  than one already in `workdir`; copies the source's tokenizer in; and pins
  `config.init_from`/`init_from_step` to the absolute path and the resolved step number, so
  config.json records where the stage came from.
  """
  from gptjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  source = os.path.abspath(config.init_from)
  diffs = config_lib.model_shape_diff(read_config(source), config)
  if diffs:
    raise ValueError(f"init_from={source} was trained with another model shape "
                     f"({'; '.join(diffs)}); use the same model config as that stage.")
  step = ckpt_lib.Checkpoints(checkpoint_dir(source), read_only=True).resolve(
      config.init_from_step)
  source_tokenizer = load_tokenizer(source)
  if os.path.exists(tokenizer_path(workdir)):
    if load_tokenizer(workdir).model_bytes != source_tokenizer.model_bytes:
      raise ValueError(f"{tokenizer_path(workdir)} differs from the tokenizer of init_from="
                       f"{source}; a stage must keep its parent's tokenizer: use a new "
                       "--workdir.")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    source_tokenizer.save(tokenizer_path(workdir))
  config.init_from, config.init_from_step = source, str(step)
