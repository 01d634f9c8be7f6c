"""Running the server: `python -m gptjax serve`, and a background server for tests and benchmarks.

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets the requests in
flight finish (for up to GRACE_SECONDS), then the app's shutdown stops the engine loop, and
any request still decoding ends with an error instead of hanging.
"""

import contextlib
import os
import signal
import socket
import sys
import threading

import uvicorn

from gptjax import generate as generate_lib
from gptjax.errors import UserError
from gptjax.serve import app as app_lib
from gptjax.serve import engine as engine_lib

GRACE_SECONDS = 10


def build(workdir: str, step=None, *, max_batch: int = 16, max_queue: int = 64,
          api_key: str | None = None):
  """(app, engine) for a checkpoint of a run, its programs compiled."""
  generator, tokenizer = generate_lib.load(workdir, step)
  try:
    engine = engine_lib.Engine(generator, max_batch=max_batch, max_queue=max_queue)
  except ValueError as e:
    raise UserError(f"{e} Pass a --max_batch that is such a multiple.") from None
  engine.warm_up()
  name = os.path.basename(os.path.abspath(workdir))
  config = app_lib.ServeConfig(model_name=name, api_key=api_key)
  return app_lib.create_app(engine, tokenizer, config), engine


def serve(workdir: str, step=None, *, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, api_key: str | None = None):
  """Serves a run until SIGTERM or SIGINT."""
  if not 0 <= port < 65536:
    raise UserError(f"--port={port} is not a TCP port; pass one in 1..65535 (0: any free one).")
  app, engine = build(workdir, step, max_batch=max_batch, api_key=api_key)
  print(f"gptjax serve: {workdir} on http://{host}:{port}/ ({engine.max_batch} decode slots, "
        f"{engine.max_len}-token context{', API key required' if api_key else ''}); "
        "Ctrl-C stops.", flush=True)
  # uvicorn shuts down gracefully on these, then raises the signal again for the handler it
  # found: this one makes that a clean exit (status 0) instead of a kill or a traceback.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _stopped)
  uvicorn.run(app, host=host, port=port, log_level="warning",
              timeout_graceful_shutdown=GRACE_SECONDS)


def _stopped(signum, _):
  print(f"gptjax serve: stopped ({signal.Signals(signum).name}).", flush=True)
  sys.exit(0)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
  """A listening-ready socket bound to a free port of `host`."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, 0))
  return sock


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1"):
  """Serves `app` on a free local port in a thread; yields its base URL, then shuts it down."""
  sock = free_socket(host)
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                         timeout_graceful_shutdown=GRACE_SECONDS))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  try:
    while not server.started:
      if not thread.is_alive():
        raise RuntimeError("the server thread ended before it started")
      threading.Event().wait(0.01)
    yield f"http://{host}:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(GRACE_SECONDS + 5)
    sock.close()
