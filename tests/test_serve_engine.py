"""The serving engine without a socket: continuous batching gives every request the tokens it
gets alone, joins and cancellations disturb no one, and serving never compiles."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh

from gptjax import config as config_lib
from gptjax import generate
from gptjax import model as model_lib
from gptjax.bench import probes
from gptjax.serve import engine as engine_lib

TINY = {"vocab_size": 61, "num_layers": 2, "num_heads": 2, "d_model": 32, "d_ff": 64,
        "max_len": 32}
RULES = config_lib.base_config().mesh.rules


@pytest.fixture(scope="module")
def generator():
  model = model_lib.Transformer(model_lib.ModelConfig(**TINY))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return generate.Generator(model, params, make_mesh(), RULES, stop_ids=())


@pytest.fixture(scope="module")
def engine(generator):
  engine = engine_lib.Engine(generator, max_batch=4, max_queue=16, stop_ids=())
  engine.warm_up()
  engine.start()
  yield engine
  engine.stop()


class Collector:
  """A request's tokens and finish reason, as the engine hands them over."""

  def __init__(self):
    self.tokens, self.reason, self.done = [], None, threading.Event()

  def __call__(self, tokens, reason):
    self.tokens += tokens
    if reason:
      self.reason = reason
      self.done.set()


def _submit(engine, prompts, options):
  collectors = [Collector() for _ in prompts]
  requests = engine.submit(prompts, options, collectors)
  return requests, collectors


def _wait(collectors):
  for c in collectors:
    assert c.done.wait(120), "the engine never finished a request"
  return [c.tokens for c in collectors]


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(9, TINY["vocab_size"], size=n).tolist() for n in lengths]


LENGTHS = [3, 9, 5, 17, 1, 12, 7, 20]


def _greedy(n, max_tokens=10):
  return [engine_lib.Options(max_tokens=max_tokens, temperature=0)] * n


def test_concurrent_greedy_requests_equal_one_at_a_time_and_generate(engine, generator):
  prompts = _prompts(LENGTHS)
  alone = [_wait(_submit(engine, [p], _greedy(1))[1])[0] for p in prompts]
  together = _wait(_submit(engine, prompts, _greedy(len(prompts)))[1])  # 8 requests, 4 slots.
  assert together == alone
  sampling = generate.Sampling(max_new_tokens=10, temperature=0)
  assert alone == [c.tokens for c in generator.generate(prompts, sampling)]


def test_a_request_joining_mid_decode_changes_no_one_else(engine):
  prompts = _prompts([6, 11, 4], seed=1)
  options = _greedy(3, max_tokens=20)
  alone = [_wait(_submit(engine, [p], options[:1])[1])[0] for p in prompts]
  _, first = _submit(engine, prompts[:2], options[:2])
  while len(first[0].tokens) < 5:  # Joins once the others are decoding.
    time.sleep(0.001)
  _, joined = _submit(engine, prompts[2:], options[2:])
  assert _wait(first + joined) == alone


def test_a_seed_reproduces_samples_and_choices_differ(engine):
  prompt = _prompts([5], seed=2)[0]
  options = [engine_lib.Options(max_tokens=12, temperature=1.0, seed=7, sample=i)
             for i in range(2)]
  a, b = _wait(_submit(engine, [prompt] * 2, options)[1])
  assert a != b
  assert _wait(_submit(engine, [prompt], options[:1])[1])[0] == a


def test_serving_after_warm_up_never_compiles(engine):
  with probes.count_compiles() as compiles:
    options = [engine_lib.Options(max_tokens=5, temperature=t, top_p=p, top_k=k,
                                  repetition_penalty=r, seed=s)
               for t, p, k, r, s in [(0, 1, 0, 1, 0), (0.7, 0.9, 5, 1.3, 1), (1.5, 0.5, 0, 0.8, 2)]]
    _wait(_submit(engine, _prompts([2, 26, 14]), options)[1])
  assert compiles[0] == 0, "a request after warm_up compiled a program"


def test_cancelling_frees_the_slot_and_a_full_queue_refuses(engine):
  long = _greedy(4, max_tokens=28)
  requests, running = _submit(engine, _prompts([2, 2, 2, 2]), long)
  _, waiting = _submit(engine, _prompts([3]), _greedy(1, 3))
  for r in requests:
    engine.cancel(r)
  assert _wait(waiting)[0] and waiting[0].reason == "length"
  _wait(running)
  assert {c.reason for c in running} <= {"cancelled", "length"}
  assert "cancelled" in {c.reason for c in running}
  with pytest.raises(engine_lib.QueueFull):
    _submit(engine, _prompts([2] * 17), _greedy(17))
  with pytest.raises(ValueError, match="context"):
    _submit(engine, _prompts([30]), _greedy(1, max_tokens=3))
