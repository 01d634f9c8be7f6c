"""Every experiment file loads, and its stages fit together."""

import glob
import os
import runpy

import pytest

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _stages(config):
  return [config[s] for s in config.stages] if pipeline.is_pipeline(config) else [config]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_builds_valid_stage_configs(path):
  config = runpy.run_path(path)["get_config"]()
  base_keys = set(config_lib.base_config().keys())
  for stage in _stages(config):
    assert set(stage.keys()) == base_keys, "experiments override keys, never add them"
    model_lib.ModelConfig(**stage.model.to_dict())  # Raises on a bad model knob.
    assert stage.data.seq_len <= stage.model.max_len
  stages = _stages(config)
  for earlier, later in zip(stages, stages[1:]):
    assert not config_lib.model_shape_diff(earlier, later), "stages must share a model shape"


def test_the_dialogue_experiment_starts_from_the_pretraining_one():
  pretrain = runpy.run_path(os.path.join(ROOT, "experiments", "shakespeare_pretrain.py"))
  dialogue = runpy.run_path(os.path.join(ROOT, "experiments", "sgd_dialogue.py"))
  assert not config_lib.model_shape_diff(pretrain["get_config"](), dialogue["get_config"]())
