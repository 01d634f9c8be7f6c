"""The HTTP server with real clients on a free 127.0.0.1 port: the official `openai` client, raw
HTTP for the bad requests, headless Chromium for the chat page, and SIGTERM on `serve`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest
from conftest import ROOT, TOKENIZER_VOCAB, gptjax, make_mesh

from gptjax import config as config_lib
from gptjax import dialogue, generate
from gptjax import model as model_lib
from gptjax import tokenizer as tokenizer_lib
from gptjax.serve import app as app_lib
from gptjax.serve import engine as engine_lib
from gptjax.serve import server as server_lib

MODEL = "tiny"
KEY = "sesame"
CONTEXT = 64


@pytest.fixture(scope="module")
def served(tiny_tokenizer_file):
  """(engine, tokenizer) of a random tiny model, the engine loop running."""
  cfg = model_lib.ModelConfig(vocab_size=TOKENIZER_VOCAB, num_layers=2, num_heads=2,
                              d_model=32, d_ff=64, max_len=CONTEXT)
  model = model_lib.Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  generator = generate.Generator(model, params, make_mesh(),
                                 config_lib.base_config().mesh.rules)
  engine = engine_lib.Engine(generator, max_batch=4, max_queue=8)
  engine.warm_up()
  engine.start()
  yield engine, tokenizer_lib.Tokenizer.load(tiny_tokenizer_file)
  engine.stop()


@pytest.fixture(scope="module")
def url(served):
  engine, tokenizer = served
  app = app_lib.create_app(engine, tokenizer, app_lib.ServeConfig(MODEL, max_body_bytes=4096),
                           manage_engine=False)
  with server_lib.background(app) as base:
    yield base


@pytest.fixture(scope="module")
def client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _chat(client, **kwargs):
  return client.chat.completions.create(model=MODEL, **{"messages": HELLO, **kwargs})


def test_a_chat_completion_counts_its_tokens(client, served):
  reply = _chat(client, max_tokens=8, temperature=0)
  choice = reply.choices[0]
  assert reply.object == "chat.completion" and reply.model == MODEL
  assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
  assert choice.finish_reason in ("stop", "length")
  assert reply.usage.prompt_tokens == len(dialogue.render_prompt(HELLO, served[1]))
  assert 1 <= reply.usage.completion_tokens <= 8
  assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chunks_reassemble_the_unstreamed_reply(client):
  whole = _chat(client, max_tokens=20, temperature=0, seed=1).choices[0]
  chunks = list(_chat(client, max_tokens=20, temperature=0, seed=1, stream=True,
                      stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.message.content
  reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert reasons[-1] == whole.finish_reason and not any(reasons[:-1])
  assert chunks[-1].usage.completion_tokens >= 1


def test_n_choices_and_a_seed(client):
  reply = _chat(client, max_tokens=10, temperature=1.0, seed=5, n=2)
  assert [c.index for c in reply.choices] == [0, 1]
  again = _chat(client, max_tokens=10, temperature=1.0, seed=5, n=2)
  assert [c.message.content for c in again.choices] == [c.message.content
                                                       for c in reply.choices]


def test_a_stop_string_ends_the_reply_before_it(client):
  text = _chat(client, max_tokens=30, temperature=0).choices[0].message.content
  assert len(text) > 6, f"the tiny model's reply is too short to cut: {text!r}"
  stop = text[4:6]
  choice = _chat(client, max_tokens=30, temperature=0, stop=[stop]).choices[0]
  assert choice.message.content == text[:text.find(stop)]
  assert choice.finish_reason == "stop"


def test_models_completions_health_metrics_and_page(client, url):
  assert [m.id for m in client.models.list().data] == [MODEL]
  completion = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5,
                                         temperature=0)
  assert completion.choices[0].finish_reason in ("stop", "length")
  assert httpx.get(url + "/health").json()["status"] == "ok"
  metrics = httpx.get(url + "/metrics").text
  for name in ("gptjax_requests_total{", "gptjax_generated_tokens_total",
               "gptjax_queue_depth", "gptjax_batch_occupancy", "gptjax_output_tokens_per_second",
               "gptjax_time_to_first_token_seconds_count"):
    assert name in metrics
  page = httpx.get(url + "/")
  assert page.status_code == 200 and "<script>" in page.text
  assert 'src="http' not in page.text and 'href="http' not in page.text  # No external assets.


def _post(url, body, *, raw=None, headers=None):
  content = raw if raw is not None else json.dumps(body)
  return httpx.post(url + "/v1/chat/completions", content=content, timeout=60,
                    headers={"Content-Type": "application/json", **(headers or {})})


BAD = [
    ("malformed JSON", None, b"{\"messages\": [", 400, None),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400,
     "messages[0].role"),
    ("empty messages", {"messages": []}, None, 400, "messages"),
    ("non-string content", {"messages": [{"role": "user", "content": ["hi"]}]}, None, 400,
     "messages[0].content"),
    ("n below 1", {"messages": HELLO, "n": 0}, None, 400, "n"),
    ("n above the limit", {"messages": HELLO, "n": 99}, None, 400, "n"),
    ("max_tokens below 1", {"messages": HELLO, "max_tokens": 0}, None, 400, "max_tokens"),
    ("max_tokens beyond the context", {"messages": HELLO, "max_tokens": 10_000}, None, 400,
     "max_tokens"),
    ("negative temperature", {"messages": HELLO, "temperature": -0.5}, None, 400,
     "temperature"),
    ("top_p of 0", {"messages": HELLO, "top_p": 0}, None, 400, "top_p"),
    ("top_p above 1", {"messages": HELLO, "top_p": 1.5}, None, 400, "top_p"),
    ("a prompt too long", {"messages": [{"role": "user", "content": "word " * 200}]}, None,
     400, "messages"),
    ("a body over the limit", {"messages": [{"role": "user", "content": "x" * 5000}]}, None,
     413, None),
    ("an unknown model", {"model": "gpt-17", "messages": HELLO}, None, 404, "model"),
]


@pytest.mark.parametrize("what,body,raw,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(url, what, body, raw, status, param):
  response = _post(url, body, raw=raw)
  assert response.status_code == status, (what, response.text)
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["message"]
  assert error["param"] == param
  assert httpx.get(url + "/health").json()["status"] == "ok"  # Still serving.


def test_the_openai_client_raises_on_errors_and_unknown_routes_are_404(client, url):
  with pytest.raises(openai.BadRequestError, match="temperature"):
    _chat(client, temperature=-1)
  response = httpx.get(url + "/v1/nothing")
  assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_full_queue_is_429_and_an_api_key_is_enforced(served):
  engine, tokenizer = served
  app = app_lib.create_app(engine, tokenizer, app_lib.ServeConfig(MODEL, api_key=KEY),
                           manage_engine=False)
  with server_lib.background(app) as base:
    assert _post(base, {"messages": HELLO}).status_code == 401
    wrong = _post(base, {"messages": HELLO}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/v1/models").status_code == 401
    good = {"Authorization": f"Bearer {KEY}"}
    assert _post(base, {"messages": HELLO, "max_tokens": 2}, headers=good).status_code == 200
    engine.max_queue = 0
    try:
      full = _post(base, {"messages": HELLO}, headers=good)
    finally:
      engine.max_queue = 8
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(url, served, monkeypatch):
  engine = served[0]
  step = engine._step  # pylint: disable=protected-access

  def slow_step(*args):
    time.sleep(0.05)  # So the reply is still decoding when the client leaves.
    return step(*args)

  monkeypatch.setattr(engine, "_step", slow_step)
  cancelled = engine.stats.finished["cancelled"]
  body = {"model": MODEL, "messages": HELLO, "stream": True, "temperature": 0}
  with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
    assert response.status_code == 200
    lines = response.iter_lines()  # Kept: dropping the iterator would close the response.
    line = next(lines)  # The role chunk.
    generated = engine.stats.generated_tokens
    deadline = time.monotonic() + 60
    while engine.stats.generated_tokens < generated + 3:  # Decoding (the rest of the context).
      assert time.monotonic() < deadline, (engine.stats, generated, line, engine.busy_slots)
      time.sleep(0.01)
  deadline = time.monotonic() + 30
  while engine.busy_slots and time.monotonic() < deadline:
    time.sleep(0.05)
  assert engine.busy_slots == 0
  assert engine.stats.finished["cancelled"] == cancelled + 1, (engine.stats, line)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_chat_page_streams_replies_and_keeps_the_history(url, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  options = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(arg)
  options.binary_location = shutil.which("chromium")
  service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
  driver = webdriver.Chrome(options=options, service=service)
  try:
    driver.get(url + "/")
    wait = WebDriverWait(driver, 60)

    def send(text, replies):
      driver.find_element(By.ID, "input").send_keys(text)
      driver.find_element(By.ID, "send").click()
      wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]"))
                 == replies or d.find_element(By.ID, "error").is_displayed())
      assert not driver.find_element(By.ID, "error").is_displayed(), (
          driver.find_element(By.ID, "error").text)

    # Replies of up to half the 64-token context: the second exchange leaves out the first
    # when it no longer fits (the page's history keeps it).
    driver.find_element(By.ID, "temperature").clear()
    driver.find_element(By.ID, "temperature").send_keys("0")
    send("Hello there", 1)
    send("And again", 2)
    users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".user")]
    assert users == ["Hello there", "And again"]
    assert all(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".assistant"))
    assert not driver.find_element(By.ID, "error").is_displayed()
    history = driver.execute_script("return history")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    driver.save_screenshot(str(tmp_path / "chat_page.png"))
    assert (tmp_path / "chat_page.png").stat().st_size > 0
    driver.find_element(By.ID, "new-chat").click()
    assert driver.execute_script("return history.length") == 0
  finally:
    driver.quit()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_a_signal_with_a_request_in_flight(trained_workdir, sig):
  sock = server_lib.free_socket()
  port = sock.getsockname()[1]
  sock.close()
  proc = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", "--workdir",
                           trained_workdir, "--port", str(port), "--max_batch", "8"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
  try:
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
      assert proc.poll() is None, proc.communicate()
      try:
        if httpx.get(base + "/health", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      assert time.monotonic() < deadline, "the server never came up"
      time.sleep(0.2)
    result = {}

    def ask():
      try:
        result["response"] = httpx.post(
            base + "/v1/chat/completions", timeout=60,
            json={"messages": HELLO, "max_tokens": 40, "temperature": 0})
      except httpx.HTTPError as e:
        result["error"] = e

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.5)
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    thread.join(60)
    assert not thread.is_alive()
    response = result.get("response")
    assert "error" in result or response.status_code in (200, 503)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
def test_bench_serve_prints_throughput_latency_and_no_errors(trained_workdir):
  out = gptjax("bench", "serve", "--workdir", trained_workdir, "--clients", "1,2",
               "--requests", "2", "--max_batch", "8", check=True)
  result = json.loads(out.stdout)
  assert [r["clients"] for r in result["serve"]] == [1, 2]
  for r in result["serve"]:
    assert r["errors"] == 0 and r["output_tokens_per_second"] > 0
    assert r["time_to_first_token_s"]["p50"] > 0 and 0 < r["batch_occupancy"] <= 1
  assert result["sequential_chat_decoding"]["output_tokens_per_second"] > 0
