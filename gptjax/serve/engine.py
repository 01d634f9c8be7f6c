"""The serving engine: continuous batching over fixed decode slots; it knows nothing of HTTP.

One thread, the engine loop, owns `max_batch` decode slots over one preallocated KV cache
(the model's whole context for each slot). Each turn of the loop:
  1. frees the slots of cancelled requests and admits waiting requests into free slots: a
     prompt is right-padded to a bucket (a power of two), prefilled alone into its slot's
     cache rows, and its first token chosen;
  2. runs one decode step for every slot at once: each row feeds its last token at its own
     cache column (`model.KVCache.index_B`), and the token choice (`generate.choose_tokens`,
     the one `sample` and `chat` use) runs with each row's own controls;
  3. hands each busy row's token to its request; a row that chose a stop token or reached its
     max_tokens or the end of the context frees its slot at once.
A request joins at a step boundary and never changes another row's tokens: rows only share
the matmuls. Programs have fixed shapes (one decode step, one prefill a bucket), all compiled
by `warm_up`, so serving never compiles. Free slots still run through the step; their rows
are ignored and their write column is held inside the cache.

The padded prompt columns past a prompt's end hold junk keys and values, but every column is
rewritten (by the row's next token) before any query can see it: a query attends only to
columns up to its own.
"""

import collections
import dataclasses
import functools
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import generate as generate_lib
from gptjax import model as model_lib
from gptjax import sharding

# Every control is on, per row: a row with temperature 0 takes the argmax, top_k 0, top_p 1
# and repetition_penalty 1 leave its logits as they are.
PLAN = generate_lib.Plan(max_new_tokens=1, greedy=False, filtered=True, penalized=True,
                         ngram=0, stop_ids=())
KNOBS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
         "repetition_penalty": np.float32}


class QueueFull(Exception):
  """More requests are waiting than the engine queues."""


@dataclasses.dataclass(frozen=True)
class Options:
  """One request's decoding controls (checked by the caller)."""
  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  repetition_penalty: float = 1.0
  seed: int = 0
  sample: int = 0  # Folded into the seed's key: the n choices of one request differ.


# What a request hears: the tokens of one step (stop tokens left out) and, at the end, why it
# finished: "stop", "length" (max_tokens or the context), "cancelled" or "shutdown".
Emit = Callable[[list[int], str | None], None]


class Request:
  """A prompt waiting for, or decoding in, a slot."""

  def __init__(self, prompt: Sequence[int], options: Options, emit: Emit):
    self.prompt, self.options, self.emit = list(prompt), options, emit
    self.cancelled = False
    self.generated = 0
    self.submitted = time.perf_counter()


@flax.struct.dataclass
class Slots:
  """The device state of every decode slot (B = max_batch rows, S = the context)."""
  cache: model_lib.KVCache
  tokens_BS: jax.Array  # Each column's token: the prompt, then the chosen tokens.
  count_B: jax.Array  # Tokens chosen so far (folded into the row's key).
  keys_B: jax.Array
  knobs: dict  # KNOBS, one value a row.


def init_slots(*, model, batch: int) -> Slots:
  cfg = model.cfg
  zeros_B = jnp.zeros((batch,), jnp.int32)
  return Slots(cache=model_lib.init_cache(cfg, zeros_B, cfg.max_len),
               tokens_BS=jnp.zeros((batch, cfg.max_len), jnp.int32), count_B=zeros_B,
               keys_B=jax.random.split(jax.random.key(0), batch),
               knobs={k: jnp.zeros((batch,), t) for k, t in KNOBS.items()})


def prefill_slot(params, slots: Slots, prompt_1P, length, slot, knobs, seed, sample, *, model):
  """Prefills one right-padded prompt (`length` real tokens) into row `slot` and chooses its
  first token; returns the slots and that token."""
  S = slots.tokens_BS.shape[1]
  take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=slot, slice_size=1,
                           axis=0)

  def put(x, row):
    return jax.lax.dynamic_update_slice_in_dim(x, row, slot, axis=0)

  zeros_1 = jnp.zeros((1,), jnp.int32)
  cache_1 = model_lib.KVCache(tuple(map(take, slots.cache.k_BHSK)),
                              tuple(map(take, slots.cache.v_BHSK)), zeros_1, zeros_1)
  logits_1PV, cache_1 = model.apply({"params": params}, prompt_1P, cache=cache_1)
  tokens_1S = jnp.pad(prompt_1P, ((0, 0), (0, S - prompt_1P.shape[1])))
  key_1 = jax.random.fold_in(jax.random.key(seed), sample)[None]
  knobs_1 = {k: jnp.reshape(v, (1,)) for k, v in knobs.items()}
  logits_1V = jax.lax.dynamic_index_in_dim(logits_1PV, length - 1, axis=1, keepdims=False)
  token_1 = generate_lib.choose_tokens(logits_1V, tokens_1S, zeros_1, length[None], key_1,
                                       zeros_1, knobs_1, plan=PLAN)
  tokens_1S = tokens_1S.at[0, length].set(token_1[0])
  cache = slots.cache.replace(k_BHSK=tuple(map(put, slots.cache.k_BHSK, cache_1.k_BHSK)),
                              v_BHSK=tuple(map(put, slots.cache.v_BHSK, cache_1.v_BHSK)),
                              index_B=slots.cache.index_B.at[slot].set(length))
  slots = Slots(cache=cache, tokens_BS=put(slots.tokens_BS, tokens_1S),
                count_B=slots.count_B.at[slot].set(1), keys_B=put(slots.keys_B, key_1),
                knobs={k: v.at[slot].set(knobs_1[k][0]) for k, v in slots.knobs.items()})
  return slots, token_1[0]


def decode_step(params, slots: Slots, *, model):
  """One token for every slot; returns the slots and the tokens [B]."""
  B, S = slots.tokens_BS.shape
  # A free row keeps stepping; holding its column inside the cache keeps its writes there.
  cache = slots.cache.replace(index_B=jnp.minimum(slots.cache.index_B, S - 1))
  token_B1 = jnp.take_along_axis(slots.tokens_BS, cache.index_B[:, None], axis=1)
  logits_B1V, cache = model.apply({"params": params}, token_B1, cache=cache)
  token_B = generate_lib.choose_tokens(logits_B1V[:, 0], slots.tokens_BS, cache.start_B,
                                       cache.index_B, slots.keys_B, slots.count_B, slots.knobs,
                                       plan=PLAN)
  tokens_BS = slots.tokens_BS.at[jnp.arange(B), cache.index_B].set(token_B, mode="drop")
  return slots.replace(cache=cache, tokens_BS=tokens_BS, count_B=slots.count_B + 1), token_B


@dataclasses.dataclass
class Stats:
  """Counters the server's /metrics reports (written by the engine loop only)."""
  steps: int = 0
  busy_slot_steps: int = 0  # Sum over steps of the busy slots: occupancy = this / steps / B.
  prompt_tokens: int = 0
  generated_tokens: int = 0
  finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class Engine:
  """Continuous batching of token requests over a Generator's model, parameters and mesh."""

  def __init__(self, generator: generate_lib.Generator, *, max_batch: int = 16,
               max_queue: int = 64, stop_ids: Sequence[int] | None = None):
    """`stop_ids` None: the generator's (the tokenizer's <|end|> and eos)."""
    dp = sharding.data_parallel_size(generator.mesh)
    if max_batch < 1 or max_batch % dp:
      raise ValueError(f"max_batch={max_batch} must be a positive multiple of the mesh's "
                       f"data-parallel size {dp}.")
    self.max_batch, self.max_queue = max_batch, max_queue
    self.stop_ids = set(generator.stop_ids if stop_ids is None else stop_ids)
    self.max_len = generator.max_len
    self.params = generator.params
    model, mesh, rules = generator.model, generator.mesh, generator.rules

    def compiled(fn, **kwargs):
      return jax.jit(sharding.under_mesh(functools.partial(fn, model=model), mesh, rules),
                     **kwargs)

    self._init = compiled(init_slots, static_argnames="batch")
    self._prefill = compiled(prefill_slot, donate_argnames="slots")
    self._step = compiled(decode_step, donate_argnames="slots")
    self.buckets = sorted({generate_lib.bucket_length(n, self.max_len)
                           for n in range(1, self.max_len + 1)})
    self.stats = Stats()
    self._slots = self._init(batch=max_batch)
    self._busy: list[Request | None] = [None] * max_batch
    self._queue: collections.deque[Request] = collections.deque()
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None

  # --------------------------------------------------------------------- the public face

  def submit(self, prompts: Sequence[Sequence[int]], options: Sequence[Options],
             emits: Sequence[Emit]) -> list[Request]:
    """Queues requests together (all or none); raises QueueFull or ValueError (no room)."""
    for prompt, o in zip(prompts, options):
      if not 1 <= len(prompt) < self.max_len or len(prompt) + o.max_tokens > self.max_len:
        raise ValueError(f"a prompt of {len(prompt)} tokens and max_tokens={o.max_tokens} do "
                         f"not fit the {self.max_len}-token context")
    requests = [Request(p, o, e) for p, o, e in zip(prompts, options, emits)]
    with self._cond:
      if self._stopping:
        raise QueueFull("the server is shutting down")
      if len(self._queue) + len(requests) > self.max_queue:
        raise QueueFull(f"{len(self._queue)} requests are already waiting (at most "
                        f"{self.max_queue})")
      self._queue.extend(requests)
      self._cond.notify()
    return requests

  def cancel(self, request: Request):
    """Frees the request's slot at the next step boundary (or drops it from the queue)."""
    with self._cond:
      request.cancelled = True
      self._cond.notify()

  @property
  def queue_depth(self) -> int:
    return len(self._queue)

  @property
  def busy_slots(self) -> int:
    return sum(r is not None for r in self._busy)

  def warm_up(self):
    """Compiles the decode step and every bucket's prefill (the only programs serving runs)."""
    for bucket in self.buckets:
      self._slots, _ = self._prefill(self.params, self._slots, np.zeros((1, bucket), np.int32),
                                     np.int32(1), np.int32(0), self._knobs(Options(1)),
                                     np.uint32(0), np.int32(0))
    self._slots, tokens = self._step(self.params, self._slots)
    jax.block_until_ready(tokens)

  def start(self):
    self._thread = threading.Thread(target=self._loop, name="gptjax-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = None):
    """Ends the loop: requests still decoding or waiting hear "shutdown"."""
    with self._cond:
      self._stopping = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  # ---------------------------------------------------------------------------- the loop

  @staticmethod
  def _knobs(o: Options) -> dict:
    values = {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p,
              "repetition_penalty": o.repetition_penalty}
    return {k: t(values[k]) for k, t in KNOBS.items()}

  def _finish(self, slot: int, reason: str, tokens=()):
    request = self._busy[slot]
    self._busy[slot] = None
    self.stats.finished[reason] += 1
    request.emit(list(tokens), reason)

  def _take(self, slot: int, token: int):
    """Hands a slot's new token (its column is prompt + generated) to its request."""
    request = self._busy[slot]
    request.generated += 1
    self.stats.generated_tokens += 1
    column = len(request.prompt) + request.generated - 1
    if token in self.stop_ids:
      self._finish(slot, "stop")
    elif request.generated >= request.options.max_tokens or column >= self.max_len - 1:
      self._finish(slot, "length", [token])
    else:
      request.emit([token], None)

  def _admit(self) -> list[tuple[int, Request]]:
    """Frees cancelled slots and pairs waiting requests with free slots (under the lock)."""
    for slot, request in enumerate(self._busy):
      if request is not None and request.cancelled:
        self._finish(slot, "cancelled")
    admitted = []
    while self._queue and None in self._busy:
      request = self._queue.popleft()
      if request.cancelled:
        self.stats.finished["cancelled"] += 1
        request.emit([], "cancelled")
        continue
      slot = self._busy.index(None)
      self._busy[slot] = request
      admitted.append((slot, request))
    return admitted

  def _prefill_into(self, slot: int, request: Request) -> int:
    n = len(request.prompt)
    bucket = generate_lib.bucket_length(n, self.max_len)
    prompt_1P = np.zeros((1, bucket), np.int32)
    prompt_1P[0, :n] = request.prompt
    o = request.options
    self._slots, token = self._prefill(self.params, self._slots, prompt_1P, np.int32(n),
                                       np.int32(slot), self._knobs(o),
                                       np.uint32(o.seed % 2**32), np.int32(o.sample))
    self.stats.prompt_tokens += n
    return token

  def _loop(self):
    while True:
      try:
        if not self._turn():
          break
      except Exception:  # noqa: BLE001  (see below)
        # A bug must not hang the requests or stop the server: they end with an error, and
        # fresh slots (compiled already) take the next ones.
        traceback.print_exc()
        with self._cond:
          for slot, request in enumerate(self._busy):
            if request is not None:
              self._finish(slot, "error")
        self._slots = self._init(batch=self.max_batch)
    with self._cond:
      for slot, request in enumerate(self._busy):
        if request is not None:
          self._finish(slot, "shutdown")
      while self._queue:
        self._queue.popleft().emit([], "shutdown")

  def _turn(self) -> bool:
    """One turn of the loop (see the module docstring); False once stopping."""
    with self._cond:
      while not self._stopping and not self._queue and not any(self._busy):
        self._cond.wait()
      if self._stopping:
        return False
      admitted = self._admit()
    firsts = [(slot, self._prefill_into(slot, r)) for slot, r in admitted]
    with self._cond:
      for slot, token in firsts:
        self._take(slot, int(token))
    if not any(self._busy):
      return True
    self._slots, token_B = self._step(self.params, self._slots)
    busy = [slot for slot, r in enumerate(self._busy) if r is not None]
    self.stats.steps += 1
    self.stats.busy_slot_steps += len(busy)
    token_B = np.asarray(token_B)
    with self._cond:
      for slot in busy:
        if self._busy[slot] is not None and not self._busy[slot].cancelled:
          self._take(slot, int(token_B[slot]))
    return True
