"""Command line: `python -m gptjax COMMAND [flags]` (also installed as `gptjax`).

  train    --config experiments/NAME.py --workdir DIR [--config.KEY=VALUE ...]
           Trains one stage; rerun on the same DIR to resume from its latest checkpoint.
  pipeline --config experiments/NAME.py --workdir DIR [--config.STAGE.KEY=VALUE ...]
           Runs the stages a pipeline config lists, each in DIR/<stage>/; rerun to continue.
  eval     --workdir DIR [--split NAME|FILE.jsonl] [--step N|best] [--json]
           Loss, perplexity and assistant_loss of a checkpoint on a split.
           With --generate [--num_conversations N] [sampling flags]: replies generated at
           every assistant turn of held-out conversations, scored against the references.
  report   --workdir DIR [--compare RUN --compare RUN ...]
           Writes DIR/report.md: stages, lineage, tokenizer, losses, dialogue metrics, host;
           with --compare, DIR/comparison.md: the runs' dialogue stages, averaged over seeds.
  prepare  --dataset NAME [--data_dir DIR]
           Downloads and prepares a tfds catalog dataset as array_record (needs tensorflow-cpu).
  sample   --workdir DIR --prompt TEXT [--prompt TEXT ...|--prompt_file FILE] [--json]
           [--max_new_tokens N --temperature T --top_k K --top_p P --repetition_penalty R
            --no_repeat_ngram_size N --num_samples N --seed S --step N|best]
           Continues each prompt with a checkpoint, num_samples times.
  chat     --workdir DIR [--system TEXT] [--message TEXT ...] [--json] [sampling flags]
           Multi-turn chat on the terminal (/reset, /exit, Ctrl-D; Ctrl-C stops a reply), or
           one reply per --message (or stdin line) for scripts.
  import-hf --model HF_DIR --workdir DIR [--dtype float32|bfloat16]
           Imports a Hugging Face GPT-2 or Llama-family model (weights and tokenizer) at step 0.
  export-hf --workdir DIR --out HF_DIR [--step N|best] [--dtype float32|bfloat16]
           Writes a checkpoint as a Hugging Face model directory transformers loads.
  bench    decode (--workdir DIR | --config experiments/NAME.py) [--step N|best]
           [--batch_sizes 1,8,64] [--torch auto|on|off]
           Prefill and decode tokens/s at each batch size against the machine's limits (on
           the CPU, next to transformers' generate on the same model), as JSON.
  bench    serve --workdir DIR [--clients 1,8,32] [--requests N] [--step N|best]
           Serving throughput and latency with concurrent streaming clients on the loopback,
           next to sequential chat-style decoding, as JSON.
  bench    train --config experiments/NAME.py [--steps N] [--torch auto|on|off]
           [--bf16 auto|off]
           Train step tokens/s, compile time and MFU (on the CPU, next to the PyTorch
           reference step's tokens/s and the bfloat16 step's time), as JSON. With
           --workdir DIR alone: the tokens/s that a `gptjax train` run logged there.
  serve    --workdir DIR [--step N|best] [--host 127.0.0.1] [--port 8000] [--max_batch 16]
           [--api_key KEY]
           An OpenAI-compatible HTTP API with continuous batching, and a chat page at /.
  merge    --workdir LORA_DIR --out DIR [--step N|best] [--json]
           Folds a LoRA run's adapters into its base; writes a plain workdir.
  classify --workdir DIR --text TEXT [--text ...|--file F] [--step N|best] [--json]
           The label and class probabilities of each text (a data.kind=classify run).

Config overrides follow ml_collections: an unknown key or a value of the wrong type is an
error naming the key, and nothing starts. Each command takes only its own flags (COMMANDS).
A problem the user can fix (gptjax.errors.UserError) is one line on stderr and exit status 1;
anything else is a bug in gptjax: its traceback, a line saying so, and exit status 2.
Problems of the command line itself (a config file that does not load, an override naming no
key, an argument that is not UTF-8) are refused the same way before any command starts
(`parse_flags`). SIGTERM or SIGINT during training saves the step in flight and exits 143 or
130 (gptjax/train.py).
"""

import errno
import json
import logging as py_logging
import os
import re
import runpy
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file defining get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config.json, tokenizer.model, checkpoints/, metrics.jsonl.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0, on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run detected from the environment (TPU VM "
    "slice workers, SLURM, Open MPI).")
_SPLIT = flags.DEFINE_string("split", None, "eval: split name (or JSONL file) to evaluate on.")
_STEP = flags.DEFINE_string("step", None, "Checkpoint to load: a step number, `best` or `latest`.")
_GENERATE = flags.DEFINE_bool(
    "generate", False, "eval: generate replies to held-out conversations and score them.")
_NUM_CONVERSATIONS = flags.DEFINE_integer(
    "num_conversations", None, "eval --generate: held-out conversations to reply to (0: all; "
    "default 50).")
_COMPARE = flags.DEFINE_multi_string(
    "compare", None, "report: a run to compare (repeat); writes DIR/comparison.md instead.")
_JSON = flags.DEFINE_bool("json", False, "Print machine-readable JSON instead of text.")
_DATASET = flags.DEFINE_string("dataset", None, "prepare: tfds catalog name, e.g. tiny_shakespeare.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "prepare: tfds data_dir to write to (default: TFDS_DATA_DIR or tfds' own).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "sample: a prompt; repeat for a batch.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "sample: a file of prompts, one a line.")
_SYSTEM = flags.DEFINE_string("system", None, "chat: a system message that opens the chat.")
_MESSAGE = flags.DEFINE_multi_string(
    "message", None, "chat: send this message and print the reply (repeatable); no terminal.")
# Sampling controls (sample and chat); defaults match gptjax.generate.Sampling.
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float(
    "top_p", 0.95, "Sample among the fewest tokens holding this probability, in (0, 1]; 1: all.")
_REPETITION_PENALTY = flags.DEFINE_float(
    "repetition_penalty", 1.0, "Above 1 discourages tokens already in the text; 1: off.")
_NO_REPEAT_NGRAM_SIZE = flags.DEFINE_integer(
    "no_repeat_ngram_size", 0, "Never repeat an n-gram of this many tokens; 0: off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "sample: completions per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
_TEXT = flags.DEFINE_multi_string("text", None, "classify: a text to label; repeatable.")
_FILE = flags.DEFINE_string("file", None, "classify: a file of texts to label, one a line.")
_MODEL = flags.DEFINE_string(
    "model", None, "import-hf: a local Hugging Face model directory (config.json, safetensors, "
    "tokenizer.json).")
_OUT = flags.DEFINE_string(
    "out", None, "export-hf, merge: the directory to write (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "import-hf / export-hf: the dtype of the written weights.")
_BENCH_STEPS = flags.DEFINE_integer("steps", 20, "bench train: timed steps after the warm-up.")
_TORCH = flags.DEFINE_enum(
    "torch", "auto", ["auto", "on", "off"], "bench train: also time the PyTorch reference step "
    "(gptjax/bench/torch_gpt.py); bench decode: also time transformers' generate on the same "
    "model (gptjax/bench/hf_generate.py); auto: when they are installed and the run is on the "
    "CPU.")
_BF16 = flags.DEFINE_enum(
    "bf16", "auto", ["auto", "off"], "bench train: also time the same step computing in "
    "bfloat16 (auto: for a float32 model on the CPU); off skips it (one compile fewer).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "serve: TCP port to listen on.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "serve: decode slots (concurrent requests).")
_API_KEY = flags.DEFINE_string(
    "api_key", None, "serve: require `Authorization: Bearer KEY` on /v1/* and /metrics.")
_CLIENTS = flags.DEFINE_string("clients", "1,8,32", "bench serve: concurrent clients to try.")
_REQUESTS = flags.DEFINE_integer(
    "requests", None, "bench serve: requests a client count (default: 2 per client, >= 16).")
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", ["1", "8"], "bench decode: batch sizes to time, comma-separated.")


def _require(flag, name: str, command: str):
  if flag.value is None:
    raise UserError(f"`{command}` needs --{name}; see `python -m gptjax --help`.")
  return flag.value


def _step():
  """--step as given: None (latest), "latest", "best" or a step number."""
  step = _STEP.value
  if step is not None and step not in ("latest", "best") and not re.fullmatch(r"\d+", step):
    raise UserError(f"--step={step!r} is not a checkpoint; expected a step number, `best` or "
                    "`latest`.")
  return step


def _config_file() -> str:
  return config_flags.get_config_filename(flags.FLAGS["config"])


def _stage_config(command: str):
  """--config (with its overrides) as a checked StageConfig; refuses a pipeline config."""
  from gptjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from gptjax import pipeline  # pylint: disable=g-import-not-at-top

  config = _require(_CONFIG, "config", command)
  if pipeline.is_pipeline(config):
    raise UserError(f"{_config_file()} is a pipeline config (it lists stages); run it with "
                    "`python -m gptjax pipeline`.")
  return config_lib.stage_config(config)


def _say(line: str):
  """Prints on process 0 only: a multi-process run reports once."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(line)


def _summary(config, result) -> str:
  step = int(result.state.step)
  line = f"Done: {config.stage} at step {step} in {result.seconds:.0f}s"
  if result.stopped_early:
    line += " (stopped early: eval loss stopped improving)"
  if result.last_train:
    line += f"; train loss {result.last_train['loss']:.4f}"
  if result.last_eval:
    line += (f"; eval loss {result.last_eval['loss']:.4f} "
             f"(perplexity {result.last_eval['perplexity']:.2f})")
    if "assistant_loss" in result.last_eval:
      line += f", assistant_loss {result.last_eval['assistant_loss']:.4f}"
  if result.best_step is not None:
    line += f"; best checkpoint: step {result.best_step}"
  return line


def cmd_train():
  """Trains the configured stage in --workdir."""
  from gptjax import train as train_lib  # Deferred: keeps `--help` and `prepare` light.
  from gptjax import workdir as workdir_lib

  config = _stage_config("train")
  workdir = _require(_WORKDIR, "workdir", "train")
  result = train_lib.train(workdir_lib.resolve(config, workdir))
  _say(f"{_summary(config, result)}. Checkpoints in {workdir}/checkpoints, "
        f"metrics in {workdir}/metrics.jsonl.")


def cmd_pipeline():
  """Runs every unfinished stage of a pipeline config in --workdir."""
  from gptjax import pipeline

  config = _require(_CONFIG, "config", "pipeline")
  workdir = _require(_WORKDIR, "workdir", "pipeline")
  if not pipeline.is_pipeline(config):
    raise UserError(f"{_config_file()} is a single-stage config; run it with "
                    "`python -m gptjax train`.")
  config = pipeline.pipeline_config(config)
  results = pipeline.run(config, workdir)
  for name, result in results.items():
    _say(_summary(config.stage(name), result))
  if not results:
    _say(f"Every stage in {workdir} had already finished.")
  pipeline.print_samples(config, workdir, print_fn=_say)
  _pipeline_report(config, workdir)


def _pipeline_report(config, workdir: str):
  """After a pipeline: its last (dialogue) stage's replies scored, and the report card."""
  import jax  # pylint: disable=g-import-not-at-top

  from gptjax import datasets, reply_eval, report  # pylint: disable=g-import-not-at-top

  last, stage = config.stages[-1]
  if stage.data.kind == "dialogue" and datasets.has_eval(stage.data):
    summary = reply_eval.evaluate_replies(os.path.join(workdir, last), step="best")
    _say(f"Replies to {summary['turns']} held-out turns: BLEU {summary['bleu']:.2f}, chrF "
         f"{summary['chrf']:.2f}, ROUGE-L {summary['rouge_l']:.2f} (in {summary['file']}).")
  if jax.process_index() == 0:
    _say(f"Report card: {report.write(workdir)}")


def cmd_eval():
  """Evaluates a checkpoint of --workdir on its eval split or --split."""
  from gptjax import evaluate

  workdir = _require(_WORKDIR, "workdir", "eval")
  for name in ("num_conversations", *SAMPLING_FLAGS):
    if flags.FLAGS[name].present and not _GENERATE.value:
      raise UserError(f"`eval` does not take --{name} without --generate; add --generate to "
                      "score generated replies, or drop it.")
  if _GENERATE.value:
    metrics = _eval_replies(workdir)
  else:
    metrics = evaluate.eval_workdir(workdir, split=_SPLIT.value, step=_step())
  if _JSON.value:
    print(json.dumps(metrics))
  else:
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in metrics.items()))


def _eval_replies(workdir: str) -> dict:
  """`eval --generate`: the sampling flags given override reply_eval's greedy defaults."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from gptjax import reply_eval  # pylint: disable=g-import-not-at-top

  given = {name: flags.FLAGS[name].value for name in SAMPLING_FLAGS if flags.FLAGS[name].present}
  sampling = dataclasses.replace(reply_eval.DEFAULT_SAMPLING, **given)
  count = _NUM_CONVERSATIONS.value
  if count is not None and count < 0:
    raise UserError(f"--num_conversations={count} is negative; pass 0 (all) or a count.")
  summary = reply_eval.evaluate_replies(
      workdir, split=_SPLIT.value, step=_step(), sampling=sampling,
      num_conversations=reply_eval.DEFAULT_CONVERSATIONS if count is None else count)
  if not _JSON.value:
    print(f"Replies to {summary['turns']} turns of {summary['conversations']} conversations "
          f"in {summary.pop('file')}; sampling: {summary.pop('sampling')}")
  return summary


def cmd_report():
  """Writes the report card of --workdir."""
  from gptjax import report

  workdir = _require(_WORKDIR, "workdir", "report")
  if _COMPARE.value:
    print(f"Wrote {report.write_comparison(workdir, _COMPARE.value)}")
  else:
    print(f"Wrote {report.write(workdir)}")


def cmd_prepare():
  """Prepares a tfds catalog dataset in array_record format (needs TensorFlow)."""
  from gptjax import data

  name = _require(_DATASET, "dataset", "prepare")
  info = data.prepare(name, _DATA_DIR.value)
  print(f"Prepared {name} {info.version} in {info.data_dir}: "
        + ", ".join(f"{s} {v.num_examples}" for s, v in info.splits.items()))


def _sampling():
  """The sampling flags, validated (a bad value is a one-line ValueError)."""
  from gptjax import generate

  return generate.Sampling(
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, repetition_penalty=_REPETITION_PENALTY.value,
      no_repeat_ngram_size=_NO_REPEAT_NGRAM_SIZE.value, num_samples=_NUM_SAMPLES.value,
      seed=_SEED.value)


def _lines(flag, what: str) -> list[str]:
  """The non-blank lines of the text file a flag names (none if unset)."""
  if not flag.value:
    return []
  try:
    with open(flag.value) as f:
      return [line.rstrip("\n") for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"Cannot read --{flag.name}: {e}; pass a text file, one {what} a "
                    "line.") from None


def cmd_sample():
  """Continues --prompt texts (or --prompt_file lines) with a checkpoint of --workdir."""
  from gptjax import generate

  workdir = _require(_WORKDIR, "workdir", "sample")
  texts = list(_PROMPT.value or []) + _lines(_PROMPT_FILE, "prompt")
  if not texts:
    raise UserError("`sample` needs --prompt TEXT (repeatable) or --prompt_file FILE.")
  for i, text in enumerate(texts):
    if not text.strip():
      raise UserError(f"Prompt {i} is empty; give every --prompt some text.")
  sampling = _sampling()
  generator, tokenizer = generate.load(workdir, _step())
  prompts = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in texts]
  completions = generator.generate(prompts, sampling)
  for c in completions:
    if c.truncated and c.sample_index == 0:
      print(f"gptjax sample: warning: prompt {c.prompt_index} has "
            f"{c.prompt_tokens + c.truncated} tokens, more than the {generator.max_len}-token "
            f"context; kept its last {c.prompt_tokens}.", file=sys.stderr)
  for c in completions:
    text = tokenizer.decode(c.tokens)
    if _JSON.value:
      print(json.dumps({"prompt": texts[c.prompt_index], "prompt_index": c.prompt_index,
                        "sample_index": c.sample_index, "text": text, "tokens": len(c.tokens),
                        "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                        "truncated": c.truncated}))
    else:
      print(f"=== prompt {c.prompt_index + 1}/{len(texts)}, sample {c.sample_index + 1}/"
            f"{sampling.num_samples} ({len(c.tokens)} tokens, {c.finish_reason}) ===")
      print(f"{texts[c.prompt_index]}{text}\n")


def cmd_chat():
  """Chats with a checkpoint of --workdir on the terminal, or replies to each --message."""
  from gptjax import chat, generate

  workdir = _require(_WORKDIR, "workdir", "chat")
  for i, message in enumerate(_MESSAGE.value or []):
    if not message.strip():
      raise UserError(f"--message number {i + 1} is empty; give every --message some text.")
  sampling = _sampling()
  if sampling.num_samples != 1:
    raise UserError("`chat` gives one reply per message; drop --num_samples.")
  generator, tokenizer = generate.load(workdir, _step())
  session = chat.ChatSession(generator, tokenizer, sampling, system=_SYSTEM.value)
  if _MESSAGE.value:
    lines = _MESSAGE.value
  elif sys.stdin.isatty():
    print(f"Chatting with {workdir} ({generator.max_len}-token context). /reset clears the "
          "history, /exit or Ctrl-D leaves, Ctrl-C stops a reply.", file=sys.stderr)
    lines = chat.terminal_lines()
  else:
    lines = sys.stdin
  status = chat.run(session, lines, as_json=_JSON.value)
  if status:
    sys.exit(status)


def cmd_bench(kind: str | None = None):
  """Runs one benchmark (`bench decode`, `bench train`, ...) and prints its JSON."""
  from gptjax import bench

  if kind not in bench.BENCHMARKS:
    raise UserError(f"`bench` needs one of: {', '.join(bench.BENCHMARKS)}; e.g. "
                    "`python -m gptjax bench decode --workdir DIR`.")
  config = _stage_config("bench") if _CONFIG.value is not None else None
  try:
    batch_sizes = tuple(int(b) for b in _BATCH_SIZES.value)
  except ValueError:
    batch_sizes = ()
  if not batch_sizes or min(batch_sizes) < 1:
    raise UserError(f"--batch_sizes={','.join(_BATCH_SIZES.value)} is not a list of batch "
                    "sizes; expected positive integers, e.g. --batch_sizes=1,8,64.")
  print(json.dumps(bench.run(kind, workdir=_WORKDIR.value, config=config, step=_step(),
                             steps=_BENCH_STEPS.value, torch=_TORCH.value, bf16=_BF16.value,
                             clients=_CLIENTS.value, requests=_REQUESTS.value,
                             max_batch=_MAX_BATCH.value, batch_sizes=batch_sizes),
                   indent=2))


def cmd_serve():
  """Serves a checkpoint of --workdir over HTTP until SIGTERM or SIGINT."""
  from gptjax.serve import server

  workdir = _require(_WORKDIR, "workdir", "serve")
  server.serve(workdir, _step(), host=_HOST.value, port=_PORT.value,
               max_batch=_MAX_BATCH.value, api_key=_API_KEY.value)


def cmd_import_hf():
  """Imports a Hugging Face model directory into a new workdir at step 0."""
  from gptjax.hf import importer

  model_dir = _require(_MODEL, "model", "import-hf")
  workdir = _require(_WORKDIR, "workdir", "import-hf")
  importer.import_hf(model_dir, workdir, dtype=_DTYPE.value or "float32")
  from gptjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(model_dir, "config.json")) as f:
    arch = json.load(f)["architectures"][0]
  m = workdir_lib.read_config(workdir).model
  print(f"Imported {arch} ({m.num_layers} layers, d_model {m.d_model}, vocabulary "
        f"{m.vocab_size}) into {workdir}; start a stage from it with --config.init_from="
        f"{workdir} (e.g. --config experiments/hf_dialogue.py:{workdir}).")


def cmd_export_hf():
  """Exports a checkpoint of --workdir as a Hugging Face model directory."""
  from gptjax.hf import exporter

  workdir = _require(_WORKDIR, "workdir", "export-hf")
  out = _require(_OUT, "out", "export-hf")
  arch = exporter.export_hf(workdir, out, step=_step(), dtype=_DTYPE.value)
  print(f"Exported {workdir} as {arch} to {out}; load it with transformers' "
        "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained.")
def cmd_classify():
  """Labels --text texts (or --file lines) with a classification run's checkpoint."""
  from gptjax import classify

  workdir = _require(_WORKDIR, "workdir", "classify")
  texts = list(_TEXT.value or []) + _lines(_FILE, "text")
  if not texts:
    raise UserError("`classify` needs --text TEXT (repeatable) or --file FILE.")
  for result in classify.classify_texts(workdir, texts, _step()):
    if _JSON.value:
      print(json.dumps(result))
    else:
      top = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])[:3]
      print(f"{result['label']}\t" + " ".join(f"{k}={v:.3f}" for k, v in top)
            + f"\t{result['text']}")


def cmd_merge():
  """Folds a LoRA run's adapters into its base and writes a plain workdir to --out."""
  from gptjax import lora

  workdir = _require(_WORKDIR, "workdir", "merge")
  out = _require(_OUT, "out", "merge")
  info = lora.merge_workdir(workdir, out, _step())
  print(json.dumps(info) if _JSON.value else
        f"Merged {workdir} step {info['step']} into its base {info['base']} (step "
        f"{info['base_step']}): a plain workdir in {info['workdir']}.")


def _host_config() -> dict:
  """`config.host` of --config (of its first stage for a pipeline), else of --workdir's run,
  else the defaults: the process settings gptjax/host.py applies before anything runs."""
  from gptjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from gptjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  host = config_lib.base_config().host.to_dict()
  config = _CONFIG.value
  if config is not None and "stages" in config and config.stages:
    config = config.get(config.stages[0])
  if config is not None and "host" in config:
    host.update(config.host.to_dict())
  elif config is None and _WORKDIR.value:
    try:
      host.update(vars(workdir_lib.read_config(_WORKDIR.value).host))
    except ValueError:
      pass  # The command itself says what is wrong with the workdir.
  return host


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                  "no_repeat_ngram_size", "seed")
# Every process of a multi-process run takes these, whatever the command.
PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id", "distributed")
# command -> (function, the flags it takes). `--config.KEY=VALUE` overrides belong to config.
COMMANDS = {
    "train": (cmd_train, ("config", "workdir")),
    "pipeline": (cmd_pipeline, ("config", "workdir")),
    "eval": (cmd_eval, ("workdir", "split", "step", "json", "generate", "num_conversations",
                        *SAMPLING_FLAGS)),
    "prepare": (cmd_prepare, ("dataset", "data_dir")),
    "report": (cmd_report, ("workdir", "compare")),
    "sample": (cmd_sample, ("workdir", "step", "prompt", "prompt_file", "json", "num_samples",
                            *SAMPLING_FLAGS)),
    "chat": (cmd_chat, ("workdir", "step", "system", "message", "json", *SAMPLING_FLAGS)),
    "bench": (cmd_bench, ("config", "workdir", "step", "steps", "torch", "bf16", "batch_sizes",
                          "clients", "requests", "max_batch")),
    "serve": (cmd_serve, ("workdir", "step", "host", "port", "max_batch", "api_key")),
    "import-hf": (cmd_import_hf, ("model", "workdir", "dtype")),
    "export-hf": (cmd_export_hf, ("workdir", "step", "out", "dtype")),
    "merge": (cmd_merge, ("workdir", "out", "step", "json")),
    "classify": (cmd_classify, ("workdir", "text", "file", "step", "json")),
}
# Commands that take one positional argument (`bench decode`).
TAKES_ARGUMENT = {"bench"}
# Flags gptjax defines (absl's own, such as --verbosity, are accepted by every command).
_OURS = {name for _, names in COMMANDS.values() for name in names} | set(PROCESS_FLAGS)


def _check_flags(command: str):
  """Refuses flags that the command does not take (they would be silently ignored)."""
  takes = set(COMMANDS[command][1]) | set(PROCESS_FLAGS)
  given = [name for name in flags.FLAGS if flags.FLAGS[name].present
           and (name in _OURS or name.startswith("config."))]
  for name in given:
    if name.split(".")[0] not in takes:
      raise UserError(f"`{command}` does not take --{name}; its flags are "
                      f"{', '.join('--' + f for f in COMMANDS[command][1])}.")


def _exit(status: int):
  """Exits after a one-line report. Work abandoned by the error (an Orbax write cut short)
  may leave asyncio tasks that log 'Task exception was never retrieved' when collected at
  exit; they say nothing the line did not."""
  py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
  sys.exit(status)


# errno values of a full disk or a folder that cannot be written.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax and tfds chatter at INFO and WARNING.
  if (len(argv) < 2 or argv[1] not in COMMANDS
      or len(argv) > (3 if argv[1] in TAKES_ARGUMENT else 2)):
    raise app.UsageError(f"Expected one command out of {', '.join(COMMANDS)}; got {argv[1:]}.")
  from gptjax import host as host_lib  # pylint: disable=g-import-not-at-top

  # First, before jax starts: this may re-execute the command (gptjax/host.py).
  host = _host_config()
  try:
    host_lib.apply(host["hugepages"], host["xla_cpu_flags"], sys.argv,
                   host.get("allocator", "auto"))
  except UserError as e:
    print(f"gptjax {argv[1]}: error: {e}", file=sys.stderr)
    _exit(1)
  from gptjax.train import Interrupted, NonFiniteLossError  # pylint: disable=g-import-not-at-top

  command = argv[1]
  try:
    _check_flags(command)
    from gptjax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto=_DISTRIBUTED.value)
    COMMANDS[command][0](*argv[2:])
  except Interrupted as e:
    # SIGTERM/SIGINT during training: the step's checkpoint is saved; say how to resume.
    print(f"gptjax {command}: {e}", file=sys.stderr)
    _exit(e.exit_status)
  except KeyboardInterrupt:
    print(f"gptjax {command}: interrupted (Ctrl-C); nothing was saved that was not saved "
          "before.", file=sys.stderr)
    _exit(130)
  except (UserError, NonFiniteLossError) as e:
    # Problems the user can fix (bad config, missing dataset, diverged loss): one line.
    print(f"gptjax {command}: error: {e}", file=sys.stderr)
    _exit(1)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
      # The machine's problem, not gptjax's: a full disk, a read-only or forbidden folder.
      print(f"gptjax {command}: error: {e}; free disk space or fix the permissions, then "
            "rerun (a train run resumes from its last complete checkpoint).", file=sys.stderr)
      _exit(1)
    traceback.print_exc()
    print(f"gptjax {command}: internal error: this is a bug in gptjax, not in your input; "
          "please report it with the traceback above.", file=sys.stderr)
    sys.exit(2)


def _fail(message: str):
  """Refuses the command line before any command starts: one line, exit status 1."""
  print(f"gptjax: error: {message}", file=sys.stderr)
  sys.exit(1)


def _not_utf8(arg: str) -> bool:
  # Python decodes argv bytes that are not UTF-8 into lone surrogates (surrogateescape).
  return any("\udc80" <= ch <= "\udcff" for ch in arg)


def _unknown_override(config, argv) -> str | None:
  """The first `--config.A.B=V` whose key path is not in `config` (as written)."""
  for arg in argv:
    match = re.fullmatch(r"--config\.([^=]+)(=.*)?", arg)
    if not match:
      continue
    node, path = config, match.group(1).split(".")
    for i, key in enumerate(path):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(path[:i]) or "the config"
        return (f"--config.{match.group(1)}: {where} has no key {key!r}; check the spelling "
                f"(gptjax/config.py lists every key)")
      node = node[key]
  return None


def _config_file_error(path: str, error: BaseException) -> str:
  what = f"{type(error).__name__}: {error}".replace("\n", " ")
  if isinstance(error, AttributeError) and "get_config" in str(error):
    what = "it defines no get_config()"
  elif isinstance(error, SyntaxError):
    what = f"syntax error at line {error.lineno}: {error.msg}"
  return (f"--config {path} could not be loaded ({what}); pass an experiment file that "
          "defines get_config(), such as experiments/shakespeare_pretrain.py")


def _config_arg(argv: list[str]) -> str | None:
  """The value of --config as written (`--config FILE` or `--config=FILE`)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every problem of the command line as one line and exit 1
  (absl and ml_collections would print tracebacks or several lines)."""
  for arg in argv[1:]:
    if _not_utf8(arg):
      _fail(f"argument {arg.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8; pass "
            "text in UTF-8 (check the terminal's or the script's encoding)")
  config_arg = _config_arg(argv)
  logging.set_verbosity(logging.ERROR)  # Until --verbosity is parsed: no warnings while loading.
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).replace("\n", " "))
  except Exception as e:  # noqa: BLE001
    # Raised while running the experiment file or applying an override to its config.
    if isinstance(e, (AttributeError, KeyError)) and config_arg:
      try:  # Was it an override naming no key? Ask the experiment's config itself.
        unknown = _unknown_override(runpy.run_path(config_arg)["get_config"](), argv[1:])
      except Exception:  # noqa: BLE001
        unknown = None
      if unknown:
        _fail(unknown)
    _fail(_config_file_error(config_arg, e))
  if flags.FLAGS["config"].present:
    config = flags.FLAGS["config"].value
    if config is None:
      _fail(f"--config {config_arg}: get_config() returned None; make it return the config")
    try:
      config.keys()  # A config file that failed to load raises here (ml_collections defers it).
    except OSError as e:
      cause = e.__cause__ or e
      if "No such file" in str(cause):
        _fail(f"--config {config_arg} does not exist; pass an experiment file such as "
              "experiments/shakespeare_pretrain.py")
      _fail(_config_file_error(config_arg, cause))
  return rest


def run():
  app.run(main, flags_parser=parse_flags)
