"""FGM adversarial training (train.adversarial="fgm"): the perturbation and the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_programs, make_mesh, tiny_config, train_steps

from gptjax import config as config_lib
from gptjax import steps as steps_lib
from gptjax.errors import UserError


def _batch(seed=0, batch=8, length=32, vocab=384):
  """Random tokens, one document a row, the last 4 positions of each row padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, vocab, size=(batch, length + 1), dtype=np.int32)
  seg = np.ones((batch, length), np.int32)
  seg[:, -4:] = 0
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos}


def _steps(config, mesh, steps=2):
  return train_steps(config, mesh, _batch(), steps)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_epsilon_zero_is_the_plain_step(dropout):
  config = tiny_config()
  config.model.dropout = dropout
  plain_state, plain = _steps(config, make_mesh())
  config.train.update(adversarial="fgm", adversarial_epsilon=0.0)
  fgm_state, fgm = _steps(config, make_mesh())
  for a, b in zip(plain, fgm):
    assert a["loss"] == b["loss"] and b["adv_loss"] == b["loss"]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-7),
               plain_state.params, fgm_state.params)


def test_fgm_changes_the_step_and_raises_the_loss():
  config = tiny_config()
  _, plain = _steps(config, make_mesh(), steps=1)
  config.train.update(adversarial="fgm", adversarial_epsilon=5.0)
  _, fgm = _steps(config, make_mesh(), steps=1)
  # The perturbation points uphill: the perturbed loss is above the clean one.
  assert fgm[0]["adv_loss"] > fgm[0]["loss"] + 1e-3, fgm[0]
  assert fgm[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)


def test_perturbation_has_the_stated_norm_per_row():
  config = config_lib.stage_config(tiny_config())
  programs = compile_programs(config, make_mesh())
  params = programs.init(jax.random.key(0)).params
  batch = jax.tree.map(jnp.asarray, _batch())
  zeros = jnp.zeros((8, 32, config.model.d_model))
  loss = lambda d: steps_lib._loss_sums(params, batch, model=programs.model, rng=None,
                                        train=False, embed_delta_BLD=d)[0]
  grad_BLD = jax.grad(loss)(zeros)
  grad_BLD = grad_BLD.at[3].set(0.0)  # A row with no gradient (all padding) stays unperturbed.
  delta_BLD = steps_lib.fgm_perturbation(grad_BLD, 0.7)
  norms = np.sqrt((np.asarray(delta_BLD) ** 2).sum(axis=(1, 2)))
  np.testing.assert_allclose(np.delete(norms, 3), 0.7, rtol=1e-5)
  assert norms[3] == 0.0
  # Along the gradient: every row's perturbation is a positive multiple of its gradient.
  cos = (np.asarray(delta_BLD) * np.asarray(grad_BLD)).sum(axis=(1, 2))
  assert (np.delete(cos, 3) > 0).all()
  # Padding positions get no gradient, so no perturbation.
  assert np.abs(np.asarray(delta_BLD)[:, -4:]).max() == 0.0


def test_sharded_fgm_step_matches_one_device():
  config = tiny_config()
  config.model.num_heads = 4
  config.train.update(adversarial="fgm", adversarial_epsilon=2.0, grad_accum_steps=2)
  one_state, one = _steps(config, make_mesh())
  many_state, many = _steps(config, make_mesh(data=2, fsdp=2, tensor=2))
  for key in ("loss", "adv_loss", "grad_norm"):
    assert one[-1][key] == pytest.approx(many[-1][key], rel=1e-4), key
  # Adam's first steps turn tiny gradients into +-lr updates, so summation order shows there.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=5e-4),
               one_state.params, many_state.params)


def test_bad_adversarial_config_is_a_clear_error():
  config = tiny_config()
  config.train.adversarial = "pgd"
  with pytest.raises(UserError, match="train.adversarial"):
    config_lib.stage_config(config)
  config.train.update(adversarial="fgm", adversarial_epsilon=-1.0)
  with pytest.raises(UserError, match="train.adversarial_epsilon"):
    config_lib.stage_config(config)
