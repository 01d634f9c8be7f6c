"""Every experiment file loads, and its stages fit together."""

import glob
import os
import runpy

import pytest
from conftest import ROOT

from gptjax import config as config_lib
from gptjax import pipeline

EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _stages(config) -> list[config_lib.StageConfig]:
  if pipeline.is_pipeline(config):
    return [stage for _, stage in pipeline.pipeline_config(config).stages]
  return [config_lib.stage_config(config)]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_builds_valid_stage_configs(path):
  # stage_config refuses keys the base config lacks and values out of range.
  stages = _stages(runpy.run_path(path)["get_config"]())
  for earlier, later in zip(stages, stages[1:]):
    assert not config_lib.model_shape_diff(earlier, later), "stages must share a model shape"


def test_the_dialogue_experiment_starts_from_the_pretraining_one():
  pretrain, dialogue = (_stages(config_lib.sibling(EXPERIMENTS[0], name))[0]
                        for name in ("shakespeare_pretrain", "sgd_dialogue"))
  assert dialogue.data.kind == "dialogue"
  assert not config_lib.model_shape_diff(pretrain, dialogue)
