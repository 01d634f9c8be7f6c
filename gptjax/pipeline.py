"""Runs the stages a pipeline config lists, in order, each a normal run in DIR/<stage>/.

  DIR/tokenizer.model   trained once on the texts of `tokenizer_stage`, shared by every stage
  DIR/<stage>/          a workdir like any `gptjax train` run; later stages start from the
                        previous stage's latest checkpoint (`init_from`)
  DIR/pipeline.json     the stages finished so far: a rerun continues where it stopped

A pipeline config holds `stages` (names), one full stage config under each name, and
`tokenizer_stage`; see experiments/chat_demo.py.
"""

import json
import os
import shutil

import jax
import ml_collections

from gptjax import datasets
from gptjax import dialogue
from gptjax import train as train_lib
from gptjax import workdir as workdir_lib


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
  return "stages" in config


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


def check(config: ml_collections.ConfigDict):
  """Raises unless every listed stage has a config and the tokenizer stage is one of them."""
  missing = [s for s in config.stages if s not in config]
  if missing or config.tokenizer_stage not in config.stages:
    raise ValueError(f"Pipeline stages {list(config.stages)} need a config each (missing: "
                     f"{missing}) and tokenizer_stage={config.tokenizer_stage!r} among them; "
                     "fix the experiment file.")


def shared_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """DIR/tokenizer.model, trained on the tokenizer stage's texts the first time."""
  path = workdir_lib.tokenizer_path(workdir)
  if os.path.exists(path):
    return workdir_lib.load_tokenizer(workdir)
  stage = config[config.tokenizer_stage]
  tokenizer = workdir_lib.new_tokenizer(stage, datasets.tokenizer_texts(stage))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(path)
  return tokenizer


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
        progress: bool = True) -> dict[str, train_lib.TrainResult]:
  """Trains every unfinished stage; returns the results of the stages run now."""
  check(config)
  shared_tokenizer(config, workdir)
  finished, results, previous = _finished(workdir), {}, None
  for name in config.stages:
    stage, stage_dir = config[name], os.path.join(workdir, name)
    if name not in finished:
      if previous and not stage.init_from:
        stage.init_from = previous
      if not stage.init_from and not os.path.exists(workdir_lib.tokenizer_path(stage_dir)):
        os.makedirs(stage_dir, exist_ok=True)
        shutil.copy(workdir_lib.tokenizer_path(workdir), workdir_lib.tokenizer_path(stage_dir))
      if progress:
        print(f"== stage {name} in {stage_dir}")
      results[name] = train_lib.train(stage, stage_dir, mesh=mesh, progress=progress)
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


def print_samples(config: ml_collections.ConfigDict, workdir: str, *, print_fn=print):
  """Replies of the last (dialogue) stage's best checkpoint to held-out conversations."""
  from gptjax import generate  # pylint: disable=g-import-not-at-top

  last = config.stages[-1]
  stage = config[last]
  if stage.data.kind != "dialogue" or not config.get("num_samples"):
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
