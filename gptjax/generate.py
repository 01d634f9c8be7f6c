"""Cached decoding: prefill a batch of prompts in one forward pass, then sample a token a step.

A batch is left-padded to a shared bucket length P (a power of two), so every row's last
prompt token sits in column P - 1 and each decode step writes one shared column of the KV
cache (`model.KVCache`); each row keeps its own positions, so it decodes as it would alone.
The loop over steps is a `jax.lax.while_loop` inside one compiled program that ends once
every row is done. Programs are compiled once per (batch, P, max_new_tokens, which controls
are on) and reused: a new prompt, seed or control value never recompiles.

Each step, the controls act on the next-token logits in this order: repetition penalty
(Keskar et al. 2019: seen tokens' positive logits are divided by it, negative ones
multiplied) -> ban tokens that would repeat an n-gram of the sequence -> argmax if
temperature is 0, else temperature -> top-k -> top-p (Holtzman et al. 2019) -> sample.
A row stops after a stop token (<|end|> or eos), after max_new_tokens, or when prompt and
reply fill the model's context (max_len tokens).
"""

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gptjax import checkpoint as ckpt_lib
from gptjax import lora as lora_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError

STOP_IDS = (tokenizer_lib.END_ID, tokenizer_lib.EOS_ID)
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Decoding controls; invalid values raise ValueError on construction."""
  max_new_tokens: int = 128  # Tokens to sample at most per sequence.
  temperature: float = 0.8  # Softmax temperature; 0 is greedy (argmax).
  top_k: int = 0  # Sample among the k most likely tokens; 0 keeps all.
  top_p: float = 0.95  # Sample among the fewest tokens holding probability top_p; 1: all.
  repetition_penalty: float = 1.0  # Above 1 discourages tokens already in the sequence.
  no_repeat_ngram_size: int = 0  # Never complete an n-gram already in the sequence; 0: off.
  num_samples: int = 1  # Sequences per prompt.
  seed: int = 0  # Same seed, same prompts: same samples.

  def __post_init__(self):
    checks = (
        (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
        (self.temperature >= 0, f"temperature={self.temperature} is negative; use 0 for "
         "greedy decoding or a positive value to sample"),
        (self.top_k >= 0, f"top_k={self.top_k} is negative; use 0 (off) or a positive k"),
        (0 < self.top_p <= 1, f"top_p={self.top_p} is outside (0, 1]; use a value in (0, 1] "
         "(1 turns it off)"),
        (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must "
         "be positive; use 1 (off) or above 1 to discourage repeats"),
        (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size={self.no_repeat_ngram_size} "
         "is negative; use 0 (off) or an n-gram size of 1 or more"),
        (self.num_samples >= 1, f"num_samples={self.num_samples} must be at least 1"),
    )
    for ok, message in checks:
      if not ok:
        raise UserError(message + ".")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static part of decoding: each distinct Plan compiles its own programs."""
  max_new_tokens: int
  greedy: bool
  filtered: bool  # top_k or top_p on.
  penalized: bool  # repetition_penalty on.
  ngram: int
  stop_ids: tuple[int, ...]

  @classmethod
  def of(cls, sampling: Sampling, max_len: int, stop_ids: tuple[int, ...]) -> "Plan":
    # A row never samples more than max_len - 1 tokens, so larger values share a program.
    return cls(max_new_tokens=min(sampling.max_new_tokens, max_len - 1),
               greedy=sampling.greedy,
               filtered=not sampling.greedy and (sampling.top_k > 0 or sampling.top_p < 1),
               penalized=sampling.repetition_penalty != 1,
               ngram=sampling.no_repeat_ngram_size, stop_ids=tuple(stop_ids))


def _knobs(sampling: Sampling) -> dict:
  """The dynamic controls: traced scalars, so new values reuse the compiled program."""
  return {"temperature": np.float32(sampling.temperature),  # Unused when 0 (greedy).
          "top_k": np.int32(sampling.top_k), "top_p": np.float32(sampling.top_p),
          "repetition_penalty": np.float32(sampling.repetition_penalty),
          "seed": np.uint32(sampling.seed % 2**32)}


# ----------------------------------------------------------------------------- on device


@flax.struct.dataclass
class DecodeState:
  """What the decode loop carries from one token to the next."""
  cache: model_lib.KVCache
  tokens_BS: jax.Array  # Each cache column's token: the left-padded prompt, then samples.
  count_B: jax.Array  # Tokens sampled so far, stop token included.
  done_B: jax.Array
  keys_B: jax.Array  # One PRNG key per row.


def _penalize(logits_BV, tokens_BS, seen_BS, penalty):
  """The repetition penalty applied to every token that occurs where `seen_BS` is True."""
  B, V = logits_BV.shape
  seen_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None],
                                       jnp.where(seen_BS, tokens_BS, V)].set(True, mode="drop")
  penalized = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalized, logits_BV)


def _ban_ngrams(logits_BV, tokens_BS, start_B, index_B, n: int):
  """-inf on every token that would complete an n-gram already in the row."""
  B, S = tokens_BS.shape
  # An n-gram starting at column j is a repeat when its first n-1 tokens equal the last n-1
  # tokens (columns index-n+1 .. index-1); then its last token, at j+n-1, is banned.
  suffix_cols = jnp.clip(index_B[:, None] - (n - 1) + jnp.arange(n - 1), 0, S - 1)
  suffix = jnp.take_along_axis(tokens_BS, suffix_cols, axis=1)  # [B, n-1]
  padded_BS = jnp.pad(tokens_BS, ((0, 0), (0, n)))
  col_S = jnp.arange(S)
  match_BS = ((col_S >= start_B[:, None]) & (col_S + n - 1 < index_B[:, None])
              & (index_B - (n - 1) >= start_B)[:, None])
  for i in range(n - 1):
    match_BS &= padded_BS[:, i:i + S] == suffix[:, i:i + 1]
  banned_BS = jnp.where(match_BS, padded_BS[:, n - 1:n - 1 + S], logits_BV.shape[-1])
  ban_BV = jnp.zeros(logits_BV.shape, bool).at[jnp.arange(B)[:, None], banned_BS].set(
      True, mode="drop")
  return jnp.where(ban_BV, -jnp.inf, logits_BV)


def _per_row(knob, B: int):
  """A control as a [B, 1] column: one value for the batch, or one a row (the server)."""
  return jnp.broadcast_to(jnp.reshape(knob, (-1, 1)), (B, 1))


def _top_k_top_p(logits_BV, top_k, top_p):
  """-inf outside the top_k tokens and outside the top_p nucleus (0 and 1 turn them off).

  top_k and top_p are scalars or one value a row."""
  B, V = logits_BV.shape
  top_k_B1, top_p_B1 = _per_row(top_k, B), _per_row(top_p, B)
  sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
  k_B1 = jnp.where(top_k_B1 > 0, jnp.minimum(top_k_B1, V), V)
  kth_B1 = jnp.take_along_axis(sorted_BV, k_B1 - 1, axis=1)
  sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token while the probability before it is below top_p: the first always stays
  # (and top_p 1 keeps all, whatever the rounding of the cumulative sum).
  keep_BV = (((jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p_B1) | (top_p_B1 >= 1))
             & (sorted_BV > -jnp.inf))
  cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


def choose_tokens(logits_BV, tokens_BS, start_B, index_B, keys_B, count_B, knobs, *,
                  plan: Plan):
  """Each row's token for column index_B[b], from the logits that predict it.

  The one token choice of `generate` and of the serving engine (gptjax/serve/engine.py):
  `knobs` values are scalars (a batch shares them) or one value a row. Row b's tokens so
  far are tokens_BS[b, start_B[b]:index_B[b]]; `count_B` (tokens sampled before) is folded
  into the row's key. Without plan.greedy, rows whose temperature is 0 still take the argmax.
  """
  B = logits_BV.shape[0]
  col_S = jnp.arange(tokens_BS.shape[1])
  if plan.penalized:
    seen_BS = (col_S >= start_B[:, None]) & (col_S < index_B[:, None])
    logits_BV = _penalize(logits_BV, tokens_BS, seen_BS,
                          _per_row(knobs["repetition_penalty"], B))
  if plan.ngram:
    logits_BV = _ban_ngrams(logits_BV, tokens_BS, start_B, index_B, plan.ngram)
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  if plan.greedy:
    return greedy_B
  temperature_B1 = _per_row(knobs["temperature"], B)
  logits_BV = logits_BV / jnp.where(temperature_B1 > 0, temperature_B1, 1.0)
  if plan.filtered:
    logits_BV = _top_k_top_p(logits_BV, knobs["top_k"], knobs["top_p"])
  # Folding in the row's own count (not the column) keeps samples independent of padding.
  keys_B = jax.vmap(jax.random.fold_in)(keys_B, count_B)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)
  return jnp.where(temperature_B1[:, 0] > 0, sampled_B, greedy_B)


def _emit(state: DecodeState, logits_BV, knobs, *, plan: Plan, max_len: int) -> DecodeState:
  """Chooses each row's token for column `cache.index_B` and updates the rows' progress."""
  index_B, start_B = state.cache.index_B, state.cache.start_B
  token_B = choose_tokens(logits_BV, state.tokens_BS, start_B, index_B, state.keys_B,
                          state.count_B, knobs, plan=plan)
  token_B = jnp.where(state.done_B, tokenizer_lib.PAD_ID, token_B)
  count_B = state.count_B + (~state.done_B).astype(jnp.int32)
  stopped_B = functools.reduce(jnp.logical_or, [token_B == s for s in plan.stop_ids],
                               jnp.zeros_like(state.done_B))
  # The sequence is full when this token is its max_len-th: it could not be fed back.
  full_B = index_B - start_B + 1 >= max_len
  done_B = state.done_B | stopped_B | (count_B >= plan.max_new_tokens) | full_B
  tokens_BS = state.tokens_BS.at[jnp.arange(token_B.shape[0]), index_B].set(token_B,
                                                                            mode="drop")
  return state.replace(tokens_BS=tokens_BS, count_B=count_B, done_B=done_B)


def prefill(params, prompt_BP, start_B, live_B, rows_B2, knobs, *, model, plan: Plan):
  """Runs the left-padded prompts through the model and samples each row's first token."""
  B, P = prompt_BP.shape
  capacity = P + plan.max_new_tokens
  cache = model_lib.init_cache(model.cfg, start_B, capacity)
  logits_BPV, cache = model.apply({"params": params}, prompt_BP, cache=cache)
  root = jax.random.key(knobs["seed"])
  # Row keys depend on (prompt, sample) only, not on the batch the prompt came in.
  keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(root, r[0]), r[1]))(
      rows_B2)
  state = DecodeState(cache=cache,
                      tokens_BS=jnp.pad(prompt_BP, ((0, 0), (0, capacity - P))),
                      count_B=jnp.zeros((B,), jnp.int32), done_B=~live_B, keys_B=keys_B)
  return _emit(state, logits_BPV[:, -1], knobs, plan=plan, max_len=model.cfg.max_len)


def decode(params, state: DecodeState, knobs, *, model, plan: Plan, steps: int):
  """Samples up to `steps` more tokens per row, stopping early once every row is done."""

  def body(carry):
    i, s = carry
    token_B1 = jnp.take_along_axis(s.tokens_BS, s.cache.index_B[:, None], axis=1)
    logits_B1V, cache = model.apply({"params": params}, token_B1, cache=s.cache)
    s = _emit(s.replace(cache=cache), logits_B1V[:, 0], knobs, plan=plan,
              max_len=model.cfg.max_len)
    return i + 1, s

  def cond(carry):
    i, s = carry
    return (i < steps) & ~jnp.all(s.done_B)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def prefill_and_decode(params, prompt_BP, start_B, live_B, rows_B2, knobs, *, model,
                       plan: Plan):
  """The whole generation in one program."""
  state = prefill(params, prompt_BP, start_B, live_B, rows_B2, knobs, model=model, plan=plan)
  return decode(params, state, knobs, model=model, plan=plan, steps=plan.max_new_tokens - 1)


# ----------------------------------------------------------------------------- on the host


@dataclasses.dataclass
class Completion:
  """One sampled sequence of one prompt."""
  prompt_index: int
  sample_index: int
  tokens: list[int]  # Sampled tokens, the stop token left out.
  finish_reason: str | None  # "stop", "length" (max_new_tokens), "context"; None: going on.
  prompt_tokens: int  # Prompt tokens used.
  truncated: int  # Prompt tokens dropped from the front to fit the context.


@dataclasses.dataclass
class Run:
  """A batch being decoded: its device state and how rows map to prompts."""
  state: DecodeState
  sampling: Sampling
  plan: Plan
  knobs: dict
  bucket: int
  rows: list[tuple[int, int]]  # (prompt index, sample index) of each live row.
  prompt_tokens: list[int]
  truncated: list[int]


def bucket_length(n: int, max_len: int) -> int:
  """The padded prompt length: the next power of two, so varied prompts share programs."""
  return min(max_len, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def fit_prompt(prompt: Sequence[int], max_len: int, max_new_tokens: int) -> list[int]:
  """The prompt, or if it does not fit the context its last tokens, leaving reply room."""
  if len(prompt) < max_len:
    return list(prompt)
  room = max(1, min(max_new_tokens, max_len // 2))
  return list(prompt[len(prompt) - (max_len - room):])


class Generator:
  """A model and its parameters on a mesh; compiles each decoding shape once and reuses it."""

  def __init__(self, model: model_lib.Transformer, params, mesh: jax.sharding.Mesh, rules,
               *, stop_ids: Sequence[int] = STOP_IDS, step: int | None = None):
    params = nn.unbox(params)
    self.step = step  # The checkpoint step of `params` (None: not read from a checkpoint).
    if model.cfg.scan_layers:
      params = model_lib.unstack_layers(params)  # The cached path runs unscanned layers.
    # A decode step multiplies a few rows by the output head. With tied embeddings that is
    # `rows @ embedding.T`, which XLA:CPU runs as a GEMM that repacks the whole transposed
    # [V, D] table on every call: 0.3 ms of a 1.2 ms step at batch 8 for the demo model,
    # 7x a plain GEMM on a [D, V] copy. On the CPU the generator keeps that copy (V * D more
    # memory) and decodes with an untied head: the same logits.
    self.head_copy = model.cfg.tie_embeddings and mesh.devices.flat[0].platform == "cpu"
    if self.head_copy:
      params = model_lib.untie_head(params)
    # Remat only matters for gradients; decoding runs plain blocks.
    model = model_lib.Transformer(dataclasses.replace(
        model.cfg, scan_layers=False, remat="none",
        tie_embeddings=model.cfg.tie_embeddings and not self.head_copy))
    self.model, self.params, self.mesh = model, params, mesh
    self.rules = sharding.rules_tuple(rules)
    self.stop_ids = tuple(stop_ids)
    self._dp = sharding.data_parallel_size(mesh)
    self._rows_2d = sharding.batch_sharding(mesh, self.rules)
    self._rows_1d = nn.logical_to_mesh_sharding(P("batch"), mesh, self.rules)

    def compiled(fn, **jit_kwargs):
      fn = sharding.under_mesh(functools.partial(fn, model=model), mesh, self.rules)
      return jax.jit(fn, **jit_kwargs)

    self.generate_program = compiled(prefill_and_decode, static_argnames="plan")
    self.prefill_program = compiled(prefill, static_argnames="plan")
    # The state is donated so the cache is updated in place from one chunk to the next.
    self.decode_program = compiled(decode, static_argnames=("plan", "steps"),
                                   donate_argnames="state")

  @property
  def max_len(self) -> int:
    return self.model.cfg.max_len

  def _inputs(self, prompts: Sequence[Sequence[int]], sampling: Sampling):
    if not prompts:
      raise UserError("No prompts given; pass at least one prompt.")
    fitted = []
    for i, prompt in enumerate(prompts):
      if len(prompt) == 0:
        raise UserError(f"Prompt {i} is empty; give it at least one token.")
      fitted.append(fit_prompt(prompt, self.max_len, sampling.max_new_tokens))
    bucket = bucket_length(max(map(len, fitted)), self.max_len)
    rows = [(i, j) for i in range(len(fitted)) for j in range(sampling.num_samples)]
    # Extra rows (done from the start) make the batch divisible by the data-parallel size.
    B = -(-len(rows) // self._dp) * self._dp
    prompt_BP = np.zeros((B, bucket), np.int32)
    start_B = np.full((B,), bucket - 1, np.int32)
    live_B = np.zeros((B,), bool)
    rows_B2 = np.zeros((B, 2), np.int32)
    for r, (i, j) in enumerate(rows):
      prompt = fitted[i]
      prompt_BP[r, bucket - len(prompt):] = prompt
      start_B[r], live_B[r], rows_B2[r] = bucket - len(prompt), True, (i, j)
    arrays = (jax.device_put(prompt_BP, self._rows_2d), jax.device_put(start_B, self._rows_1d),
              jax.device_put(live_B, self._rows_1d), jax.device_put(rows_B2, self._rows_2d))
    meta = dict(bucket=bucket, rows=rows, prompt_tokens=[len(p) for p in fitted],
                truncated=[len(p) - len(f) for p, f in zip(prompts, fitted)])
    return arrays, meta

  def _plan(self, sampling: Sampling) -> Plan:
    return Plan.of(sampling, self.max_len, self.stop_ids)

  def start(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Run:
    """Prefills the prompts and samples their first tokens (asynchronously)."""
    arrays, meta = self._inputs(prompts, sampling)
    plan, knobs = self._plan(sampling), _knobs(sampling)
    state = self.prefill_program(self.params, *arrays, knobs, plan=plan)
    return Run(state=state, sampling=sampling, plan=plan, knobs=knobs, **meta)

  def advance(self, run: Run, steps: int) -> Run:
    """Samples up to `steps` more tokens per row (asynchronously); `run`'s state is consumed."""
    run.state = self.decode_program(self.params, run.state, run.knobs, plan=run.plan,
                                    steps=steps)
    return run

  def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
    """Samples `num_samples` completions per prompt, prompt-major, in one compiled program."""
    arrays, meta = self._inputs(prompts, sampling)
    plan = self._plan(sampling)
    state = self.generate_program(self.params, *arrays, _knobs(sampling), plan=plan)
    return completions(Run(state=state, sampling=sampling, plan=plan, knobs={}, **meta),
                       self.stop_ids)

  def stream(self, prompt: Sequence[int], sampling: Sampling,
             chunk: int = 8) -> Iterator[Completion]:
    """Yields the completion of one prompt as it grows, `chunk` tokens per compiled call."""
    run = self.start([prompt], dataclasses.replace(sampling, num_samples=1))
    while True:
      completion = completions(run, self.stop_ids)[0]
      yield completion
      if completion.finish_reason:
        return
      self.advance(run, chunk)


def completions(run: Run, stop_ids: Sequence[int]) -> list[Completion]:
  """The live rows' completions so far (fetches the tokens from the devices)."""
  tokens_BS, count_B, done_B = jax.device_get(
      (run.state.tokens_BS, run.state.count_B, run.state.done_B))
  out = []
  for r, (i, j) in enumerate(run.rows):
    tokens = tokens_BS[r, run.bucket:run.bucket + count_B[r]].tolist()
    reason = None
    if tokens and tokens[-1] in stop_ids and done_B[r]:
      reason, tokens = "stop", tokens[:-1]
    elif done_B[r]:
      reason = "length" if count_B[r] >= run.sampling.max_new_tokens else "context"
    out.append(Completion(prompt_index=i, sample_index=j, tokens=tokens, finish_reason=reason,
                          prompt_tokens=run.prompt_tokens[i], truncated=run.truncated[i]))
  return out


def load(workdir: str, step: int | str | None = None, *, mesh=None,
         stop_ids: Sequence[int] | None = None) -> tuple[Generator, tokenizer_lib.Tokenizer]:
  """A Generator with the parameters of checkpoint `step` (None: latest, "best") of a run;
  `stop_ids` None: the tokenizer's <|end|> and eos (an imported tokenizer has its own ids)."""
  config = workdir_lib.read_config(workdir)
  tokenizer = workdir_lib.load_tokenizer(workdir)
  mesh = mesh or sharding.make_mesh(config.mesh.sizes)
  model = model_lib.Transformer(config.model)
  rules = sharding.rules_tuple(config.mesh.rules)
  # Only the parameters' shapes and shardings: serving needs no optimizer state.
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  abstract = ckpt_lib.abstract_like(nn.unbox(boxed),
                                    sharding.logical_shardings(boxed, mesh, rules))
  directory = workdir_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise UserError(f"{workdir} has no checkpoints/ folder; train it first or pass the "
                     "--workdir of a trained run.")
  params, found = lora_lib.load_checkpoint(workdir, step, abstract)  # LoRA: folded.
  if stop_ids is None:
    stop_ids = (tokenizer.end_id, tokenizer.eos_id)
  return Generator(model, params, mesh, rules, stop_ids=stop_ids, step=found), tokenizer
