"""The HTTP face of the engine: an OpenAI-compatible API, /health, /metrics and a chat page.

Requests become engine calls and engine output becomes OpenAI's schema; the engine
(gptjax/serve/engine.py) knows nothing of HTTP. Conversations are rendered with the chat
template the dialogue stage trains on (`dialogue.render_prompt`), so chat-token literals in a
message stay text. OpenAI's presence_penalty and frequency_penalty (each in [-2, 2]) map onto
gptjax's one multiplicative control: repetition_penalty = exp((presence + frequency) / 4),
1 when both are 0. Stop strings are found in the decoded text (the text streamed holds back
the characters that could begin one); a request that meets one frees its slot at once, and so
does a stream whose client disconnects. Every bad request gets OpenAI's error JSON
(`{"error": {"message", "type", "param", "code"}}`) and disturbs nothing else.
"""

import asyncio
import dataclasses
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import (
  HTMLResponse,
  JSONResponse,
  PlainTextResponse,
  StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptjax import dialogue
from gptjax.serve import engine as engine_lib
from gptjax.serve import page
from gptjax.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # As OpenAI.


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """What the server allows (the `serve` flags)."""
  model_name: str
  api_key: str | None = None  # If set, /v1/* and /metrics need `Authorization: Bearer KEY`.
  max_n: int = 8  # Choices a request may ask for.
  max_body_bytes: int = 1 << 20  # Larger request bodies get 413.


class ApiError(Exception):
  """A request the API refuses, with OpenAI's error fields."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                    code, kind)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status)


class Metrics:
  """Counters for /metrics in Prometheus' text format."""

  def __init__(self):
    self.requests: dict[tuple[str, int], int] = {}
    self.ttft_sum, self.ttft_count = 0.0, 0
    self.started = time.monotonic()
    self._last = (self.started, 0)

  def request(self, endpoint: str, status: int):
    self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

  def first_token(self, seconds: float):
    self.ttft_sum += seconds
    self.ttft_count += 1

  def text(self, engine: engine_lib.Engine) -> str:
    stats = engine.stats
    now = time.monotonic()
    last_time, last_tokens = self._last
    rate = (stats.generated_tokens - last_tokens) / max(now - last_time, 1e-9)
    self._last = (now, stats.generated_tokens)
    occupancy = stats.busy_slot_steps / stats.steps / engine.max_batch if stats.steps else 0.0
    lines = ["# HELP gptjax_requests_total HTTP requests by endpoint and status.",
             "# TYPE gptjax_requests_total counter"]
    lines += [f'gptjax_requests_total{{endpoint="{e}",status="{s}"}} {n}'
              for (e, s), n in sorted(self.requests.items())]
    gauges = [
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prompt_tokens),
        ("generated_tokens_total", "counter", "Tokens decoded.", stats.generated_tokens),
        ("decode_steps_total", "counter", "Batched decode steps.", stats.steps),
        ("queue_depth", "gauge", "Requests waiting for a slot.", engine.queue_depth),
        ("batch_slots", "gauge", "Decode slots.", engine.max_batch),
        ("batch_slots_busy", "gauge", "Decode slots in use.", engine.busy_slots),
        ("batch_occupancy", "gauge", "Mean busy fraction of the slots over decode steps.",
         occupancy),
        ("output_tokens_per_second", "gauge", "Tokens decoded a second since the last scrape.",
         rate),
    ]
    for name, kind, help_text, value in gauges:
      lines += [f"# HELP gptjax_{name} {help_text}", f"# TYPE gptjax_{name} {kind}",
                f"gptjax_{name} {value}"]
    lines += ["# HELP gptjax_time_to_first_token_seconds From the request to its first token.",
              "# TYPE gptjax_time_to_first_token_seconds summary",
              f"gptjax_time_to_first_token_seconds_sum {self.ttft_sum}",
              f"gptjax_time_to_first_token_seconds_count {self.ttft_count}"]
    lines += [f'gptjax_finished_total{{reason="{r}"}} {n}'
              for r, n in sorted(stats.finished.items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- requests


def _number(body: dict, name: str, default, *, low=None, high=None, low_open=False,
            integer=False):
  value = body.get(name)
  if value is None:
    return default
  ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
  if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
    raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                   f"{json.dumps(value)}.", param=name, code="invalid_type")
  if ((low is not None and (value <= low if low_open else value < low))
      or (high is not None and value > high)):
    bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
    raise ApiError(400, f"'{name}'={value} is outside {bounds}.", param=name,
                   code="invalid_value")
  return value


def _stops(body: dict) -> list[str]:
  stop = body.get("stop")
  if stop is None:
    return []
  stops = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
      or len(stops) > MAX_STOP_STRINGS):
    raise ApiError(400, f"'stop' must be a non-empty string or a list of at most "
                   f"{MAX_STOP_STRINGS} of them.", param="stop", code="invalid_value")
  return stops


def _messages(body: dict) -> list[dict]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.",
                   param="messages", code="invalid_value")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ApiError(400, f"messages[{i}] is not an object.", param=f"messages[{i}]",
                     code="invalid_type")
    if m.get("role") not in dialogue.ROLES:
      raise ApiError(400, f"messages[{i}].role={json.dumps(m.get('role'))} is not one of "
                     f"{', '.join(dialogue.ROLES)}.", param=f"messages[{i}].role",
                     code="invalid_value")
    if not isinstance(m.get("content"), str):
      raise ApiError(400, f"messages[{i}].content must be a string.",
                     param=f"messages[{i}].content", code="invalid_type")
    out.append({"role": m["role"], "content": m["content"]})
  return out


@dataclasses.dataclass(frozen=True)
class Call:
  """A checked completion request."""
  prompt: list[int]
  options: list[engine_lib.Options]  # One a choice.
  stops: list[str]
  stream: bool
  include_usage: bool


def parse_call(body: dict, prompt: list[int], max_len: int, max_n: int) -> Call:
  """The sampling fields of a (chat) completion body, checked against the context."""
  n = _number(body, "n", 1, low=1, high=max_n, integer=True)
  temperature = _number(body, "temperature", 1.0, low=0, high=2)
  top_p = _number(body, "top_p", 1.0, low=0, high=1, low_open=True)
  presence = _number(body, "presence_penalty", 0.0, low=-2, high=2)
  frequency = _number(body, "frequency_penalty", 0.0, low=-2, high=2)
  seed = _number(body, "seed", None, integer=True)
  field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else \
      "max_tokens"
  max_tokens = _number(body, field, None, low=1, integer=True)
  stops = _stops(body)
  stream = body.get("stream") or False
  if not isinstance(stream, bool):
    raise ApiError(400, "'stream' must be true or false.", param="stream", code="invalid_type")
  stream_options = body.get("stream_options") or {}
  if not isinstance(stream_options, dict):
    raise ApiError(400, "'stream_options' must be an object.", param="stream_options",
                   code="invalid_type")
  if len(prompt) >= max_len:
    raise ApiError(400, f"The prompt has {len(prompt)} tokens; the model's context is "
                   f"{max_len} tokens, with room for at least one reply token. Shorten the "
                   "messages.", param="messages", code="context_length_exceeded")
  room = max_len - len(prompt)
  if max_tokens is not None and max_tokens > room:
    raise ApiError(400, f"'{field}'={max_tokens} does not fit: the prompt has {len(prompt)} "
                   f"tokens of the {max_len}-token context, leaving {room}.", param=field,
                   code="context_length_exceeded")
  seed = random.getrandbits(32) if seed is None else seed
  options = [engine_lib.Options(max_tokens=max_tokens or room, temperature=float(temperature),
                                top_p=float(top_p), seed=seed, sample=i,
                                repetition_penalty=math.exp((presence + frequency) / 4))
             for i in range(n)]
  return Call(prompt, options, stops, stream, bool(stream_options.get("include_usage")))


class Choice:
  """One choice's tokens arriving from the engine thread, turned into text deltas."""

  def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer, stops: list[str]):
    self.loop, self.tokenizer, self.stops = loop, tokenizer, stops
    self.queue: asyncio.Queue = asyncio.Queue()
    self.tokens: list[int] = []
    self.sent = ""
    self.request: engine_lib.Request | None = None

  def emit(self, tokens: list[int], reason: str | None):
    """Called on the engine thread."""
    self.loop.call_soon_threadsafe(self.queue.put_nowait, (tokens, reason))

  def _delta(self, upto: int) -> str:
    text = self._text[len(self.sent):upto]
    self.sent += text
    return text

  async def deltas(self) -> AsyncIterator[tuple[str, str | None]]:
    """(text, None) as tokens arrive, then (text, "stop" | "length") once."""
    hold = max(map(len, self.stops), default=1) - 1
    while True:
      tokens, reason = await self.queue.get()
      self.tokens += tokens
      self._text = self.tokenizer.decode(self.tokens)
      found = [i for i in (self._text.find(s, max(0, len(self.sent) - hold))
                           for s in self.stops) if i >= 0]
      if found:
        if self.request is not None:
          self.request.cancelled = True  # The engine frees the slot at the next step.
        yield self._delta(min(found)), "stop"
        return
      if reason in ("stop", "length"):
        yield self._delta(len(self._text)), reason
        return
      if reason is not None:
        raise ApiError(503, f"The request ended early ({reason}); retry it.",
                       code=reason, kind="server_error")
      # A multi-byte character split across tokens decodes as U+FFFD until its last byte.
      stable = len(self._text.rstrip("\ufffd")) - hold
      if stable > len(self.sent):
        yield self._delta(stable), None


# ----------------------------------------------------------------------------- the app


def create_app(engine: engine_lib.Engine, tokenizer: Tokenizer, config: ServeConfig,
               *, manage_engine: bool = True) -> FastAPI:
  """The server's ASGI app; with `manage_engine` it starts and stops the engine loop."""

  async def lifespan(_):
    if manage_engine:
      engine.start()
    yield
    if manage_engine:
      await asyncio.to_thread(engine.stop)

  app = FastAPI(title="gptjax", docs_url=None, redoc_url=None, openapi_url=None,
                lifespan=lifespan)
  app.state.metrics = metrics = Metrics()

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return ApiError(e.status_code, str(e.detail), code=code).response()

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return e.response()

  def check_key(request: Request):
    if config.api_key is None:
      return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {config.api_key}":
      raise ApiError(401, "Missing or wrong API key; send `Authorization: Bearer KEY` with the "
                     "server's --api_key.", code="invalid_api_key")

  async def read_body(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
      raise ApiError(413, f"The request body has {length} bytes, more than the "
                     f"{config.max_body_bytes} allowed.", code="request_too_large")
    raw = b""
    async for chunk in request.stream():
      raw += chunk
      if len(raw) > config.max_body_bytes:
        raise ApiError(413, f"The request body is over the {config.max_body_bytes} bytes "
                       "allowed.", code="request_too_large")
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise ApiError(400, f"The body is not valid JSON ({e}).", code="invalid_json") from None
    if not isinstance(body, dict):
      raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if model is not None and model != config.model_name:
      raise ApiError(404, f"The model {json.dumps(model)} does not exist; this server serves "
                     f"{config.model_name!r}.", param="model", code="model_not_found")
    return body

  async def complete(request: Request, endpoint: str, chat: bool):
    try:
      check_key(request)
      body = await read_body(request)
      if chat:
        prompt = dialogue.render_prompt(_messages(body), tokenizer)
      else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
          text = text[0]
        if not isinstance(text, str) or not text:
          raise ApiError(400, "'prompt' must be a non-empty string.", param="prompt",
                         code="invalid_value")
        prompt = [tokenizer.bos_id, *tokenizer.encode(text, chat_tokens=False)]
      call = parse_call(body, prompt, engine.max_len, config.max_n)
      loop = asyncio.get_running_loop()
      choices = [Choice(loop, tokenizer, call.stops) for _ in call.options]
      try:
        requests = engine.submit([call.prompt] * len(choices), call.options,
                                 [c.emit for c in choices])
      except engine_lib.QueueFull as e:
        raise ApiError(429, f"Too many requests are waiting: {e}. Retry shortly.",
                       code="rate_limit_exceeded", kind="rate_limit_error") from None
      for choice, r in zip(choices, requests):
        choice.request = r
    except ApiError as e:
      metrics.request(endpoint, e.status)
      return e.response()
    start = time.perf_counter()
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": config.model_name}

    def usage():
      completion = sum(len(c.tokens) for c in choices)
      return {"prompt_tokens": len(call.prompt), "completion_tokens": completion,
              "total_tokens": len(call.prompt) + completion}

    def cancel_all():
      for r in requests:
        engine.cancel(r)

    if not call.stream:
      try:
        results = []
        for i, choice in enumerate(choices):
          text, reason = "", None
          async for delta, reason in choice.deltas():
            if not text and delta and i == 0:
              metrics.first_token(time.perf_counter() - start)
            text += delta
          results.append((text, reason))
      except ApiError as e:
        metrics.request(endpoint, e.status)
        return e.response()
      finally:
        cancel_all()
      metrics.request(endpoint, 200)
      if chat:
        out = [{"index": i, "message": {"role": "assistant", "content": t},
                "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(results)]
      else:
        out = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(results)]
      return JSONResponse({**head, "choices": out, "usage": usage()})

    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i, text, reason, first=False):
      if chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        if reason and not text:
          delta = {}
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
      else:
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
      return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    async def events():
      merged: asyncio.Queue = asyncio.Queue()

      async def pump(i, choice):
        try:
          async for delta, reason in choice.deltas():
            await merged.put((i, delta, reason))
        except ApiError as e:
          await merged.put((i, e, "error"))

      tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
      status = 200
      try:
        if chat:
          for i in range(len(choices)):
            yield chunk(i, "", None, first=True)
        done, first = 0, True
        while done < len(choices):
          i, delta, reason = await merged.get()
          if reason == "error":
            status = delta.status
            yield f"data: {json.dumps(delta.body())}\n\n"
            break
          if first and delta:
            metrics.first_token(time.perf_counter() - start)
            first = False
          if delta or reason:
            yield chunk(i, delta, reason)
          done += reason is not None
        if status == 200 and call.include_usage:
          yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
        yield "data: [DONE]\n\n"
      finally:
        # Also on a client that went away: the slots are freed at the next step.
        cancel_all()
        for task in tasks:
          task.cancel()
        metrics.request(endpoint, status)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await complete(request, "/v1/chat/completions", chat=True)

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await complete(request, "/v1/completions", chat=False)

  @app.get("/v1/models")
  async def models(request: Request):
    check_key(request)
    return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                        "created": int(metrics.started), "owned_by": "gptjax"}]}

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": config.model_name, "slots": engine.max_batch,
            "busy": engine.busy_slots, "queued": engine.queue_depth}

  @app.get("/metrics")
  async def prometheus(request: Request):
    check_key(request)
    return PlainTextResponse(metrics.text(engine), media_type="text/plain; version=0.0.4")

  @app.get("/")
  async def chat_page():
    return HTMLResponse(page.html_page(config.model_name, engine.max_len))

  return app
