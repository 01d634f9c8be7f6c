"""The run directory, a public contract, and resolving a stage into it.

  DIR/config.json       the resolved config (rebuilds the model for eval, sample and chat)
  DIR/tokenizer.model   the SentencePiece model
  DIR/checkpoints/      Orbax CheckpointManager, one folder a step
  DIR/metrics.jsonl     one JSON object a line (see gptjax/metrics.py)
  DIR/tensorboard/      TensorBoard event files

A stage runs in two moves. `resolve` checks everything it can without writing: the workdir
against the run it may already hold, `init_from` (a workdir with a checkpoint, the same model
shape and tokenizer), and pins `init_from` to an absolute path and `init_from_step` to a step
number. A resumed run keeps the provenance its config.json recorded when it started. Then
`prepare` writes: on process 0 only, the tokenizer (copied, or trained once) and config.json;
the other processes wait at a barrier and read them.
"""

import dataclasses
import fcntl
import json
import os
import shutil

import jax

from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.model")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def read_config(workdir: str) -> config_lib.StageConfig:
  """The config a run in `workdir` was trained with."""
  path = config_path(workdir)
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a gptjax workdir (no config.json); pass the --workdir "
                    "of a `gptjax train` run.")
  try:
    with open(path) as f:
      return config_lib.from_json(f.read())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is damaged ({_first_line(e)}); restore it from a copy (or rewrite "
                    "it from the experiment file with a `gptjax train` rerun).") from None


def atomic_write(path: str, data: str | bytes):
  """Writes via a temporary file and a rename: readers never see half a file."""
  tmp = path + ".tmp"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)


def load_tokenizer(workdir: str) -> tokenizer_lib.Tokenizer:
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no tokenizer.model; pass the --workdir of a trained run.")
  return load_tokenizer_file(path)


def load_tokenizer_file(path: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer at `path`; a file SentencePiece cannot read is a UserError naming it."""
  try:
    return tokenizer_lib.Tokenizer.load(path)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  SentencePiece and tokenizers raise plain errors.
    raise UserError(f"{path} is not a readable tokenizer ({_first_line(e)}); "
                    "restore it from a copy, or use a new --workdir.") from None


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


@dataclasses.dataclass(frozen=True)
class InitSource:
  """The checkpoint whose parameters start a stage."""
  workdir: str  # Absolute.
  step: int


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage ready to run: its checked config (with init_from pinned), where it runs, and
  where its parameters and tokenizer come from."""
  config: config_lib.StageConfig
  workdir: str  # Absolute.
  init: InitSource | None  # Parameters of an earlier stage; None: fresh or resumed.
  tokenizer_from: str | None  # An existing tokenizer file to use; None: train one.
  resuming: bool  # The workdir holds a checkpoint of this run: training continues from it.


# The `stage` that `import-hf` records in the config.json of the workdirs it writes.
IMPORTED_STAGE = "import"


def resolve(config: config_lib.StageConfig, workdir: str, *,
            tokenizer_from: str | None = None) -> Stage:
  """Checks `config` against `workdir` and its init source, writing nothing (see module doc).

  `tokenizer_from` names a tokenizer file for a stage that has none of its own yet and no
  `init_from` (a pipeline's shared tokenizer).
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory; pass a new or existing "
                    "run directory.")
  _check_data_files(config.data)
  recorded = read_config(workdir) if os.path.exists(config_path(workdir)) else None
  if recorded is not None and recorded.stage == IMPORTED_STAGE:
    # An import holds parameters only (no optimizer state or data position) to start from.
    raise UserError(f"Workdir {workdir} holds an imported model, not a run to resume; train a "
                    f"stage from it in a new --workdir with --config.init_from={workdir}.")
  if recorded is not None:
    diffs = config_lib.model_shape_diff(recorded, config)
    if diffs:
      raise UserError(f"Workdir {workdir} holds a run with another model shape "
                      f"({'; '.join(diffs)}); use a new --workdir or the same model config.")
  resuming = ckpt_lib.latest_step(checkpoint_dir(workdir)) is not None
  init = None
  if resuming and recorded is not None:
    # The run continues from its own checkpoint; its recorded provenance stands.
    config = config.replace(init_from=recorded.init_from,
                            init_from_step=recorded.init_from_step)
  elif config.init_from:
    init = _init_source(config, config.init_from)
    config = config.replace(init_from=init.workdir, init_from_step=str(init.step))
  source_tokenizer = tokenizer_path(init.workdir) if init else tokenizer_from
  own = tokenizer_path(workdir)
  if os.path.exists(own):
    if source_tokenizer and _read(own) != _read(source_tokenizer):
      parent = f"init_from={init.workdir}" if init else source_tokenizer
      raise UserError(f"{own} differs from the tokenizer of {parent}; a stage must keep its "
                      "parent's tokenizer: use a new --workdir.")
    source_tokenizer = own
  elif resuming:
    raise UserError(f"{workdir} has checkpoints but no tokenizer.model; restore the file or "
                    "use a new --workdir.")
  if source_tokenizer:
    tokenizer = load_tokenizer_file(source_tokenizer)
    _check_vocab(tokenizer, config, source_tokenizer)
    # A LoRA run records the ids of the token rows it trains: they depend on the tokenizer.
    config = config.replace(lora=config.lora.pinned(tokenizer))
  elif config.model.vocab_size < tokenizer_lib.MIN_VOCAB_SIZE:  # A tokenizer will be trained.
    raise UserError(f"model.vocab_size={config.model.vocab_size} is too small to train a "
                    f"tokenizer: expected at least {tokenizer_lib.MIN_VOCAB_SIZE} (reserved and "
                    "byte pieces) plus room for the text's characters; raise "
                    "--config.model.vocab_size.")
  return Stage(config=config, workdir=workdir, init=init, tokenizer_from=source_tokenizer,
               resuming=resuming)


def _check_data_files(d: config_lib.DataConfig):
  """JSONL files the stage reads exist (their records are checked when they are read)."""
  if d.kind != "dialogue":
    return
  for key in ("train_files", "eval_files"):
    for path in filter(None, (p.strip() for p in getattr(d, key).split(","))):
      if not os.path.isfile(path):
        raise UserError(f"data.{key}: {path} does not exist; pass JSONL files with one "
                        '{"messages": [...]} object a line.')


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _init_source(config: config_lib.StageConfig, init_from: str) -> InitSource:
  """The checkpoint `init_from` / `init_from_step` name, checked against `config`."""
  source = os.path.abspath(init_from)
  if not os.path.isdir(source):
    raise UserError(f"init_from={init_from} does not exist; pass the workdir of an earlier "
                    "stage (a `gptjax train` run).")
  diffs = config_lib.model_shape_diff(read_config(source), config)
  if diffs:
    raise UserError(f"init_from={source} was trained with another model shape "
                    f"({'; '.join(diffs)}); use the same model config as that stage.")
  if not os.path.exists(tokenizer_path(source)):
    raise UserError(f"init_from={source} has no tokenizer.model; pass a complete workdir.")
  step = ckpt_lib.resolve_step(checkpoint_dir(source), config.init_from_step)
  return InitSource(workdir=source, step=step)


def _check_vocab(tokenizer: tokenizer_lib.Tokenizer, config: config_lib.StageConfig,
                 path: str):
  if tokenizer.vocab_size != config.model.vocab_size:
    raise UserError(f"{path} has {tokenizer.vocab_size} tokens but model.vocab_size="
                    f"{config.model.vocab_size}; use a new --workdir or a matching "
                    "--config.model.vocab_size.")


def prepare(stage: Stage, training_texts=None, before_writing=None) -> tokenizer_lib.Tokenizer:
  """Writes the stage's tokenizer and config.json (process 0) and returns the tokenizer.

  `training_texts` is called for the texts only when there is no tokenizer to use.
  `before_writing(tokenizer)` runs on process 0 before anything is written: the checks that
  need the tokenizer (reading the datasets) refuse a run there and leave the workdir as found.
  """
  own = tokenizer_path(stage.workdir)
  if jax.process_index() == 0:
    if stage.tokenizer_from:
      tokenizer = load_tokenizer_file(stage.tokenizer_from)
    else:
      tokenizer = new_tokenizer(stage.config, training_texts())
    _check_vocab(tokenizer, stage.config, stage.tokenizer_from or own)
    if before_writing:
      before_writing(tokenizer)
    os.makedirs(stage.workdir, exist_ok=True)
    if not stage.tokenizer_from:
      tokenizer.save(own)
    elif os.path.abspath(stage.tokenizer_from) != own:
      tmp = own + ".tmp"
      shutil.copyfile(stage.tokenizer_from, tmp)
      os.replace(tmp, own)
    atomic_write(config_path(stage.workdir), config_lib.to_json(stage.config))
  sharding.barrier(f"prepare {stage.workdir}")
  if jax.process_index() != 0:
    tokenizer = load_tokenizer_file(own)
  return tokenizer


class Lock:
  """One live run a workdir: an exclusive `flock` on the directory itself, held by process 0.

  The kernel drops the lock when its process exits, however it dies (kill -9 included), so a
  crashed run never leaves a workdir locked, and no lock file is written.
  """

  def __init__(self, workdir: str):
    self.workdir, self._fd = workdir, None

  def acquire(self):
    """Takes the lock if the workdir exists (call again once it is created); raises
    UserError if another live process holds it."""
    if self._fd is not None or jax.process_index() != 0 or not os.path.isdir(self.workdir):
      return
    fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UserError(f"{self.workdir} is in use: another live gptjax process is training in "
                      "it; wait for that run to finish (or stop it) or use another "
                      "--workdir.") from None
    self._fd = fd

  def release(self):
    if self._fd is not None:
      os.close(self._fd)  # Closing the descriptor releases the flock.
      self._fd = None


def new_tokenizer(config: config_lib.StageConfig, texts) -> tokenizer_lib.Tokenizer:
  """A tokenizer trained on `texts` with the config's vocab size and tokenizer settings."""
  return tokenizer_lib.train_tokenizer(
      texts, vocab_size=config.model.vocab_size, model_type=config.tokenizer.model_type,
      seed=config.train.seed, max_chars=config.tokenizer.max_chars)
