"""`bench serve`: the HTTP server under concurrent streaming clients on the loopback, next to
the same workload decoded one conversation at a time the way `chat` does.

For each client count C, C clients share a pool of requests (chat-rendered customer messages,
sampled at temperature 0.8 with a seed each, up to `max_tokens` reply tokens) and each sends its
next request, streamed, as soon as the last one ends. Reported: requests/s and output tokens/s
(completion tokens over the wall time), time to first token and inter-token latency (the gaps
between streamed chunks, a chunk per decode step) at p50/p95, the engine's batch occupancy
over the run, and errors (any status but 200, or a stream without [DONE]). The server runs in
this process, warmed up first, so no number includes a compilation.
"""

import asyncio
import json
import time

import httpx
import numpy as np

from gptjax import dialogue
from gptjax import generate as generate_lib
from gptjax.errors import UserError
from gptjax.serve import app as app_lib
from gptjax.serve import engine as engine_lib
from gptjax.serve import server as server_lib

MESSAGES = ("I need a hotel in Paris for two nights.", "Can you book a table for four at 7pm?",
            "What time does the train to Rome leave?", "My flight was cancelled, what now?",
            "Find me a cheap rental car in Lima.", "Is there a dentist open on Sunday?",
            "I want to see a movie tonight.", "Please change my booking to Friday.")
TEMPERATURE = 0.8


def _percentiles(values) -> dict:
  if not values:
    return {"p50": None, "p95": None}
  return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


async def _one(client: httpx.AsyncClient, url: str, body: dict, out: dict):
  start = time.perf_counter()
  last, gaps, first, tokens, done = None, [], None, 0, False
  async with client.stream("POST", url, json=body) as response:
    if response.status_code != 200:
      out["errors"] += 1
      return
    async for line in response.aiter_lines():
      if not line.startswith("data: "):
        continue
      data = line[len("data: "):]
      if data == "[DONE]":
        done = True
        break
      chunk = json.loads(data)
      if "error" in chunk:
        break
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      if not chunk["choices"] or "role" in chunk["choices"][0]["delta"]:
        continue
      now = time.perf_counter()
      if first is None:
        first = now - start
      elif last is not None:
        gaps.append(now - last)
      last = now
  if not done:
    out["errors"] += 1
    return
  out["tokens"] += tokens
  out["ttft"].append(first if first is not None else time.perf_counter() - start)
  out["itl"] += gaps


async def _drive(base: str, clients: int, bodies: list[dict]) -> dict:
  out = {"errors": 0, "tokens": 0, "ttft": [], "itl": []}
  pending = list(bodies)

  async def client_loop(client):
    while pending:
      await _one(client, base + "/v1/chat/completions", pending.pop(), out)

  limits = httpx.Limits(max_connections=clients + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    out["seconds"] = time.perf_counter() - start
  return out


def _bodies(count: int, max_tokens: int) -> list[dict]:
  return [{"messages": [{"role": "user", "content": MESSAGES[i % len(MESSAGES)]}],
           "max_tokens": max_tokens, "temperature": TEMPERATURE, "seed": i, "stream": True,
           "stream_options": {"include_usage": True}} for i in range(count)]


def sequential(generator: generate_lib.Generator, tokenizer, bodies: list[dict]) -> dict:
  """The same requests one after another through `Generator.stream`, as `chat` decodes."""
  prompts = [dialogue.render_prompt(b["messages"], tokenizer) for b in bodies]

  def one(prompt, body):
    sampling = generate_lib.Sampling(max_new_tokens=body["max_tokens"], temperature=TEMPERATURE,
                                     seed=body["seed"])
    completion = None
    for completion in generator.stream(prompt, sampling):
      pass
    return len(completion.tokens)

  one(prompts[0], bodies[0])  # Compiles.
  start = time.perf_counter()
  tokens = sum(one(p, b) for p, b in zip(prompts, bodies))
  seconds = time.perf_counter() - start
  return {"requests": len(bodies), "seconds": seconds, "output_tokens": tokens,
          "requests_per_second": len(bodies) / seconds,
          "output_tokens_per_second": tokens / seconds}


def run(*, workdir: str | None = None, step=None, clients: str = "1,8,32",
        requests: int | None = None, max_batch: int = 16, max_tokens: int = 32,
        **unused_flags) -> dict:
  """Serving throughput and latency of a run at each client count, and sequential decoding."""
  if not workdir:
    raise UserError("`bench serve` needs --workdir DIR (a trained run).")
  try:
    counts = [int(c) for c in clients.split(",")]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise UserError(f"--clients={clients!r} is not a list of positive integers; e.g. 1,8,32.")
  generator, tokenizer = generate_lib.load(workdir, step)
  longest = max(len(dialogue.render_prompt([{"role": "user", "content": m}], tokenizer))
                for m in MESSAGES)
  if longest >= generator.max_len:
    raise UserError(f"The benchmark's prompts need {longest + 1} tokens of context; "
                    f"{workdir}'s model has {generator.max_len}.")
  max_tokens = min(max_tokens, generator.max_len - longest)  # Every request fits.
  # Enough slots for the most clients: a request never waits behind the batch.
  engine = engine_lib.Engine(generator, max_batch=max(max_batch, max(counts)),
                             max_queue=max(counts) * 2)
  engine.warm_up()
  app = app_lib.create_app(engine, tokenizer, app_lib.ServeConfig("bench"))
  results = []
  with server_lib.background(app) as base:
    asyncio.run(_drive(base, 1, _bodies(1, max_tokens)))  # Warms the HTTP path.
    for c in counts:
      count = requests or max(16, 2 * c)
      steps, busy = engine.stats.steps, engine.stats.busy_slot_steps
      out = asyncio.run(_drive(base, c, _bodies(count, max_tokens)))
      steps, busy = engine.stats.steps - steps, engine.stats.busy_slot_steps - busy
      results.append({
          "clients": c, "requests": count, "seconds": out["seconds"],
          "requests_per_second": count / out["seconds"],
          "output_tokens_per_second": out["tokens"] / out["seconds"],
          "output_tokens": out["tokens"],
          "time_to_first_token_s": _percentiles(out["ttft"]),
          "inter_token_latency_s": _percentiles(out["itl"]),
          "batch_occupancy": busy / steps / engine.max_batch if steps else 0.0,
          "errors": out["errors"]})
  base_rate = results[0]["output_tokens_per_second"]
  for r in results:
    r["speedup_vs_first"] = r["output_tokens_per_second"] / base_rate if base_rate else None
  count = requests or max(16, 2 * max(counts))
  return {"workdir": workdir, "max_batch": engine.max_batch, "max_tokens": max_tokens,
          "context": engine.max_len, "serve": results,
          "sequential_chat_decoding": sequential(generator, tokenizer, _bodies(count, max_tokens))}
