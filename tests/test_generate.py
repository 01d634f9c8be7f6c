"""Cached decoding and sampling controls on tiny random models, and the `sample` command."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import gptjax, make_mesh

from gptjax.bench import probes
from gptjax import config as config_lib
from gptjax import generate
from gptjax import model as model_lib
from gptjax import sharding

TINY = dict(vocab_size=61, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=32)
RULES = config_lib.base_config().mesh.rules
GREEDY = generate.Sampling(max_new_tokens=12, temperature=0)
SAMPLED = generate.Sampling(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3)


def _tiny(seed=0, **knobs):
  cfg = model_lib.ModelConfig(**{**TINY, **knobs})
  model = model_lib.Transformer(cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params


def _generator(model=None, params=None, *, mesh=None, stop_ids=(), **knobs):
  if model is None:
    model, params = _tiny(**knobs)
  return generate.Generator(model, params, mesh or make_mesh(), RULES, stop_ids=stop_ids)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(9, TINY["vocab_size"], size=n).tolist() for n in lengths]


def _tokens(completions):
  return [c.tokens for c in completions]


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_matches_full_forward_at_every_position(positions, scan):
  model, params = _tiny(positions=positions, scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, TINY["vocab_size"])
  full_BLV = model.apply({"params": params}, tokens)
  if scan:
    params = model_lib.unstack_layers(params)
  decoder = model_lib.Transformer(dataclasses.replace(model.cfg, scan_layers=False))
  # Row 1 is left-padded by 3 columns; prefill 5 columns, then decode 2 tokens then 1 a call.
  pad = 3
  cache = model_lib.init_cache(decoder.cfg, jnp.array([0, pad]), 14 + pad)
  rows = jnp.stack([tokens[0], jnp.concatenate([jnp.zeros(pad, jnp.int32), tokens[1, :-pad]])])
  got = []
  for lo, hi in [(0, 5), (5, 7)] + [(c, c + 1) for c in range(7, 14)]:
    logits_BLV, cache = decoder.apply({"params": params}, rows[:, lo:hi], cache=cache)
    got.append(logits_BLV)
  got_BLV = jnp.concatenate(got, axis=1)
  np.testing.assert_allclose(got_BLV[0], full_BLV[0], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got_BLV[1, pad:], full_BLV[1, :-pad], atol=2e-5, rtol=1e-5)


def test_one_row_decodes_by_multiply_and_sum_with_the_full_forward_logits():
  # On the CPU one row's decode step multiplies and sums instead of running matmuls over its
  # cache (model._elementwise_decode); the logits still match the full forward pass.
  model, params = _tiny()
  tokens = jax.random.randint(jax.random.key(2), (1, 14), 0, TINY["vocab_size"])
  full_BLV = model.apply({"params": params}, tokens)
  cache = model_lib.init_cache(model.cfg, jnp.array([0]), 14)
  logits_BLV, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
  got = [logits_BLV]
  for c in range(5, 14):
    logits_BLV, cache = model.apply({"params": params}, tokens[:, c:c + 1], cache=cache)
    got.append(logits_BLV)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), full_BLV, atol=2e-5, rtol=1e-5)
  one, two = jnp.zeros((1, 1, 2, 16)), jnp.zeros((2, 1, 2, 16))
  assert model_lib._elementwise_decode(one)  # Tests run on the CPU.
  assert not model_lib._elementwise_decode(two)  # More rows: matmuls.
  assert not model_lib._elementwise_decode(jnp.zeros((1, 5, 2, 16)))  # Prefill: matmuls.


def test_one_row_decode_step_does_not_copy_its_caches():
  # With matmuls over the cache, XLA:CPU copied every layer's K and V caches in each step of
  # the batch-1 decode loop; the multiply-and-sum reads them in place.
  generator = _generator()
  run = generator.start(_prompts([5]), GREEDY)
  hlo = generator.decode_program.lower(generator.params, run.state, run.knobs, plan=run.plan,
                                       steps=4).compile().as_text()
  k_BHSK = run.state.cache.k_BHSK[0]
  shape = "f32[" + ",".join(map(str, k_BHSK.shape)) + "]"
  copies = [line for line in hlo.splitlines()
            if f"= {shape}" in line and " copy(" in line]
  assert not copies, copies[:3]

@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_greedy_equals_repeated_full_forward_argmax(positions):
  model, params = _tiny(positions=positions)
  prompts = _prompts([5, 9])
  full = jax.jit(lambda t: model.apply({"params": params}, t))
  for prompt, got in zip(prompts, _tokens(_generator(model, params).generate(prompts, GREEDY))):
    seq = list(prompt)
    for _ in range(GREEDY.max_new_tokens):
      padded = np.zeros((1, TINY["max_len"]), np.int32)  # Causal: the padding after is unseen.
      padded[0, :len(seq)] = seq
      seq.append(int(np.argmax(full(padded)[0, len(seq) - 1])))
    assert got == seq[len(prompt):]


def test_on_the_cpu_a_tied_head_decodes_from_a_transposed_copy_with_the_same_logits():
  # XLA:CPU runs `rows @ embedding.T` as a GEMM that repacks the table every decode step;
  # the generator decodes through a [D, V] copy instead (see Generator.__init__).
  model, params = _tiny()
  generator = _generator(model, params)
  assert generator.head_copy and not generator.model.cfg.tie_embeddings
  np.testing.assert_array_equal(generator.params["head"], nn.unbox(params)["embedding"].T)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY["vocab_size"])
  np.testing.assert_allclose(generator.model.apply({"params": generator.params}, tokens),
                             model.apply({"params": params}, tokens), atol=1e-6, rtol=1e-6)
  untied, untied_params = _tiny(tie_embeddings=False)
  assert not _generator(untied, untied_params).head_copy  # Its head is a [D, V] leaf already.


def test_scanned_model_decodes_like_its_unscanned_twin():
  scanned, params = _tiny(scan_layers=True)
  unscanned = model_lib.Transformer(dataclasses.replace(scanned.cfg, scan_layers=False))
  prompts = _prompts([4, 7])
  assert (_tokens(_generator(scanned, params).generate(prompts, GREEDY))
          == _tokens(_generator(unscanned, model_lib.unstack_layers(params)).generate(
              prompts, GREEDY)))


def test_top_k_1_equals_greedy():
  generator, prompts = _generator(), _prompts([3, 6, 11])
  top1 = dataclasses.replace(SAMPLED, top_k=1, temperature=1.5)
  assert _tokens(generator.generate(prompts, top1)) == _tokens(generator.generate(prompts, GREEDY))


def _ngrams_ending_after(seq, n, start):
  return [tuple(seq[i - n + 1:i + 1]) for i in range(max(start, n - 1), len(seq))]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_never_emits_a_repeated_ngram(n):
  generator, prompts = _generator(), _prompts([2, 5])
  plain = dataclasses.replace(GREEDY, max_new_tokens=25)
  banned = dataclasses.replace(plain, no_repeat_ngram_size=n)
  repeated_somewhere = False
  for prompt, free, constrained in zip(prompts, generator.generate(prompts, plain),
                                       generator.generate(prompts, banned)):
    seq = prompt + constrained.tokens
    earlier = {tuple(seq[i:i + n]) for i in range(len(prompt) - n + 1)}
    for gram in _ngrams_ending_after(seq, n, len(prompt)):
      assert gram not in earlier, f"{n}-gram {gram} repeated in {seq}"
      earlier.add(gram)
    grams = _ngrams_ending_after(prompt + free.tokens, n, n - 1)
    repeated_somewhere |= len(set(grams)) < len(grams)
  assert repeated_somewhere, "greedy decoding of a random model should repeat without the ban"


def test_same_seed_same_samples_and_different_seeds_differ():
  generator, prompts = _generator(), _prompts([4, 8])
  two = dataclasses.replace(SAMPLED, num_samples=2)
  first, again = generator.generate(prompts, two), generator.generate(prompts, two)
  other = generator.generate(prompts, dataclasses.replace(two, seed=4))
  assert _tokens(first) == _tokens(again)
  assert _tokens(first) != _tokens(other)
  assert [(c.prompt_index, c.sample_index) for c in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert first[0].tokens != first[1].tokens, "samples of one prompt should differ"


def test_batched_prompts_of_different_lengths_match_each_alone():
  generator, prompts = _generator(), _prompts([2, 7, 13])
  batched = generator.generate(prompts, GREEDY)
  assert _tokens(batched) == [generator.generate([p], GREEDY)[0].tokens for p in prompts]
  # Sampling keys depend on (prompt index, sample index), so the first prompt matches too.
  assert (generator.generate(prompts, SAMPLED)[0].tokens
          == generator.generate(prompts[:1], SAMPLED)[0].tokens)


def test_rows_stop_at_a_stop_token_at_max_new_tokens_and_when_the_context_is_full():
  model, params = _tiny()
  prompt = _prompts([6])[0]
  free = _generator(model, params).generate([prompt], SAMPLED)[0]
  assert free.finish_reason == "length" and len(free.tokens) == SAMPLED.max_new_tokens
  stop = next(t for i, t in enumerate(free.tokens) if i >= 2 and t not in free.tokens[:i])
  stopped = _generator(model, params, stop_ids=(stop,)).generate([prompt], SAMPLED)[0]
  assert stopped.finish_reason == "stop"
  assert stopped.tokens == free.tokens[:free.tokens.index(stop)]
  long_prompt = _prompts([TINY["max_len"] - 4])[0]
  both = _generator(model, params).generate([prompt, long_prompt], SAMPLED)
  assert both[1].finish_reason == "context" and len(both[1].tokens) == 4
  assert both[0].tokens == free.tokens, "a row runs on after another fills its context"


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens():
  generator = _generator()
  prompt = _prompts([50])[0]
  sampling = dataclasses.replace(GREEDY, max_new_tokens=10)
  got = generator.generate([prompt], sampling)[0]
  assert got.prompt_tokens == TINY["max_len"] - 10 and got.truncated == 50 - got.prompt_tokens
  assert got.tokens == generator.generate([prompt[got.truncated:]], sampling)[0].tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p=0.0 is outside (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 is outside (0, 1]"),
    (dict(temperature=-1.0), "temperature=-1.0 is negative"),
    (dict(top_k=-2), "top_k=-2 is negative"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
    (dict(num_samples=0), "num_samples=0 must be at least 1"),
])
def test_out_of_range_controls_are_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")) as e:
    generate.Sampling(**kwargs)
  assert "\n" not in str(e.value)


def test_an_empty_prompt_is_an_error():
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    _generator().generate([[5, 6], []], GREEDY)


def test_filters_keep_the_top_k_tokens_and_the_top_p_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda k, p: np.isfinite(generate._top_k_top_p(logits, k, p))[0].tolist()  # pylint: disable=protected-access
  assert kept(0, 1.0) == [True] * 4
  assert kept(2, 1.0) == [False, True, False, True]
  assert kept(0, 0.8) == [False, True, False, True]  # 0.5 + 0.3 reach 0.8.
  assert kept(0, 0.81) == [False, True, True, True]
  assert kept(0, 0.1) == [False, True, False, False]  # The most likely token always stays.


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
  logits = jnp.array([[2.0, -1.0, 3.0, -4.0]])
  seen = jnp.array([[True, True]])
  got = generate._penalize(logits, jnp.array([[0, 1]]), seen, 2.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, [[1.0, -2.0, 3.0, -4.0]])


def test_same_shapes_compile_once():
  generator = _generator()
  nucleus = dataclasses.replace(SAMPLED, top_p=0.9)

  def calls(seed):
    # New prompts of the same bucket, a new seed and new control values: the same programs.
    generator.generate(_prompts([5, 6], seed=seed),
                       dataclasses.replace(nucleus, seed=seed, top_p=0.9 - seed / 10))
    for _ in generator.stream(_prompts([6], seed=seed)[0], nucleus, chunk=3):
      pass

  with probes.count_compiles() as compiles:
    calls(seed=1)
  assert compiles[0] >= 3, "the first calls compile generate, prefill and decode"
  with probes.count_compiles() as compiles:
    calls(seed=2)
  assert compiles[0] == 0, "calls with the same shapes must not recompile"
  assert generator.generate_program._cache_size() == 1  # pylint: disable=protected-access


def test_streaming_in_chunks_gives_the_one_call_tokens():
  generator, prompt = _generator(), _prompts([5])[0]
  steps = [c.tokens for c in generator.stream(prompt, SAMPLED, chunk=4)]
  assert [len(s) for s in steps] == [1, 5, 9, 12]
  assert steps[-1] == generator.generate([prompt], SAMPLED)[0].tokens


def test_a_sharded_mesh_gives_the_one_device_tokens():
  model, params = _tiny(vocab_size=64)  # Divisible by the tensor axis.
  params = jax.device_get(nn.unbox(params))
  mesh = make_mesh(2, 2, 2)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  sharded = jax.device_put(params, sharding.logical_shardings(boxed, mesh, RULES))
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded))
  prompts = _prompts([3, 9, 5])
  for sampling in (GREEDY, SAMPLED):
    assert (_tokens(_generator(model, sharded, mesh=mesh).generate(prompts, sampling))
            == _tokens(_generator(model, params).generate(prompts, sampling)))


# ----------------------------------------------------------------------------- the command



@pytest.mark.slow
def test_sample_command_prints_json_lines_and_reproduces_with_a_seed(trained_workdir):
  args = ["sample", "--workdir", trained_workdir, "--prompt", "ROMEO:", "--prompt",
          "To be", "--num_samples", "2", "--max_new_tokens", "6", "--seed", "5", "--json"]
  out = gptjax(*args)
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(r["prompt"], r["sample_index"]) for r in rows] == [
      ("ROMEO:", 0), ("ROMEO:", 1), ("To be", 0), ("To be", 1)]
  assert all({"text", "tokens", "finish_reason", "prompt_tokens"} <= set(r) for r in rows)
  assert all(r["tokens"] <= 6 for r in rows)
  assert gptjax(*args).stdout == out.stdout, "the same seed gives the same samples"

  text = gptjax("sample", "--workdir", trained_workdir, "--prompt", "ROMEO:",
                "--max_new_tokens", "4")
  assert text.returncode == 0 and text.stdout.startswith("=== prompt 1/1, sample 1/1")
  assert "ROMEO:" in text.stdout


@pytest.mark.slow
def test_sample_command_says_what_is_wrong_in_one_line(trained_workdir, tmp_path):
  long = gptjax("sample", "--workdir", trained_workdir, "--prompt", "word " * 80,
                "--max_new_tokens", "4")
  assert long.returncode == 0 and "more than the 64-token context; kept its last" in long.stderr
  empty_run = tmp_path / "empty"
  shutil.copytree(trained_workdir, empty_run, ignore=shutil.ignore_patterns("checkpoints"))
  for args, message in [
      (["--prompt", "hi", "--top_p", "1.5"], "top_p=1.5 is outside (0, 1]"),
      (["--prompt", "hi", "--temperature", "-1"], "temperature=-1.0 is negative"),
      (["--prompt", " "], "Prompt 0 is empty"),
      ([], "needs --prompt"),
      (["--prompt", "hi", "--step", "999"], "No checkpoint 999"),
  ]:
    out = gptjax("sample", "--workdir", trained_workdir, *args)
    assert out.returncode == 1 and message in out.stderr, (args, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  out = gptjax("sample", "--workdir", str(empty_run), "--prompt", "hi")
  assert out.returncode == 1 and "no checkpoints" in out.stderr, out.stderr


@pytest.mark.slow
def test_bench_decode_prints_throughput_against_the_machine_limits(trained_workdir):
  out = gptjax("bench", "decode", "--workdir", trained_workdir)
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report["benchmark"] == "decode" and report["matmul_gflops"] > 0
  assert [r["batch"] for r in report["results"]] == [1, 8]
  for r in report["results"]:
    assert r["decode_tokens_per_sec"] > 0 and r["prefill_tokens_per_sec"] > 0
    assert r["recompiles"] == 0 and r["ratio"] > 0 and r["memory_gbps"] > 0
  assert "needs one of: decode" in gptjax("bench", "--workdir", trained_workdir).stderr
