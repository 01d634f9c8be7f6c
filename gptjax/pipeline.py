"""Runs the stages a pipeline config lists, in order, each a normal run in DIR/<stage>/.

  DIR/tokenizer.model   trained once on the texts of `tokenizer_stage`, shared by every stage
  DIR/<stage>/          a workdir like any `gptjax train` run; later stages start from the
                        previous stage's latest checkpoint (`init_from`)
  DIR/pipeline.json     the stages finished so far: a rerun continues where it stopped

A pipeline config holds `stages` (names), one full stage config under each name, and
`tokenizer_stage`; see experiments/chat_demo.py.
"""

import dataclasses
import json
import os

import jax
import ml_collections

from gptjax import config as config_lib
from gptjax import datasets
from gptjax import dialogue
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax import train as train_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError

TOP_KEYS = ("stages", "tokenizer_stage", "num_samples")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """A pipeline config, checked: its stages in order, each a StageConfig."""
  stages: tuple[tuple[str, config_lib.StageConfig], ...]
  tokenizer_stage: str  # The stage whose training texts train the shared tokenizer.
  num_samples: int  # Held-out conversations the last (dialogue) stage replies to at the end.

  def stage(self, name: str) -> config_lib.StageConfig:
    return dict(self.stages)[name]


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
  return "stages" in config


def pipeline_config(config: ml_collections.ConfigDict) -> PipelineConfig:
  """The typed form of a pipeline ConfigDict; raises UserError for a malformed one."""
  names = tuple(config.stages)
  unknown = [k for k in config.keys() if k not in TOP_KEYS and k not in names]
  missing = [s for s in names if s not in config]
  tokenizer_stage = config.get("tokenizer_stage", "")
  if not names or unknown or missing or tokenizer_stage not in names:
    raise UserError(f"Pipeline stages {list(names)} need a config each (missing: {missing}), "
                    f"tokenizer_stage={tokenizer_stage!r} among them, and no other keys "
                    f"(unknown: {unknown}); fix the experiment file.")
  return PipelineConfig(
      stages=tuple((name, config_lib.stage_config(config[name])) for name in names),
      tokenizer_stage=tokenizer_stage, num_samples=int(config.get("num_samples", 0)))


def _finished(workdir: str) -> list[str]:
  path = os.path.join(workdir, "pipeline.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["finished"]


def _mark_finished(workdir: str, finished: list[str]):
  if jax.process_index() == 0:
    workdir_lib.atomic_write(os.path.join(workdir, "pipeline.json"),
                             json.dumps({"finished": finished}, indent=2))
  sharding.barrier(f"pipeline.json {len(finished)}")


def shared_tokenizer(config: PipelineConfig, workdir: str) -> str:
  """The path of DIR/tokenizer.model, trained (on process 0) on the tokenizer stage's texts
  the first time."""
  path = workdir_lib.tokenizer_path(workdir)
  if not os.path.exists(path) and jax.process_index() == 0:
    stage = config.stage(config.tokenizer_stage)
    tokenizer = workdir_lib.new_tokenizer(stage, datasets.tokenizer_texts(stage))
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(path)
  sharding.barrier(f"pipeline tokenizer {workdir}")
  return path


def run(config: PipelineConfig, workdir: str, *, mesh=None,
        progress: bool = True) -> dict[str, train_lib.TrainResult]:
  """Trains every unfinished stage; returns the results of the stages run now."""
  workdir = os.path.abspath(workdir)
  finished = _finished(workdir)
  for name, stage_config in config.stages:  # Mesh, batch and data of each, before writing.
    steps_lib.validate(stage_config, mesh or sharding.make_mesh(stage_config.mesh.sizes))
    if name not in finished:
      datasets.check_present(stage_config.data)
  tokenizer = shared_tokenizer(config, workdir)
  results, previous = {}, None
  for name, stage_config in config.stages:
    stage_dir = os.path.join(workdir, name)
    if name not in finished:
      if previous and not stage_config.init_from:
        stage_config = stage_config.replace(init_from=previous)
      stage = workdir_lib.resolve(stage_config, stage_dir, tokenizer_from=tokenizer)
      if progress and jax.process_index() == 0:
        print(f"== stage {name} in {stage_dir}")
      results[name] = train_lib.train(stage, mesh=mesh, progress=progress)
      finished.append(name)
      _mark_finished(workdir, finished)
    previous = stage_dir
  return results


def held_out_prompts(conversations, count: int) -> list[tuple[list[dict], str]]:
  """(history, reference reply) pairs: each conversation cut before a middle assistant turn
  that follows a user turn."""
  pairs = []
  for messages in conversations:
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0
               and messages[i - 1]["role"] == "user"]
    if replies:
      i = replies[len(replies) // 2]
      pairs.append((messages[:i], messages[i]["content"]))
    if len(pairs) == count:
      break
  return pairs


def print_samples(config: PipelineConfig, workdir: str, *, print_fn=print):
  """Replies of the last (dialogue) stage's best checkpoint to held-out conversations."""
  from gptjax import generate  # pylint: disable=g-import-not-at-top

  last, stage = config.stages[-1]
  if stage.data.kind != "dialogue" or not config.num_samples:
    return
  conversations, _ = datasets.conversations(stage.data, "eval")
  pairs = held_out_prompts(conversations, config.num_samples)
  generator, tokenizer = generate.load(os.path.join(workdir, last), step="best")
  prompts = [dialogue.render_prompt(history, tokenizer) for history, _ in pairs]
  sampling = generate.Sampling(max_new_tokens=48, temperature=0.0, no_repeat_ngram_size=3)
  for (history, reference), completion in zip(pairs, generator.generate(prompts, sampling)):
    print_fn("\n--- held-out conversation")
    for m in history[-4:]:
      print_fn(f"{m['role']:>9}: {m['content']}")
    print_fn(f"    model: {tokenizer.decode(completion.tokens)}")
    print_fn(f"reference: {reference}")
