"""The chat page served at GET /: one self-contained HTML file (no build step, no external
assets) that streams replies from /v1/chat/completions and keeps the history in the page."""

import html
import json

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gptjax chat: __TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; display: flex; flex-direction: column;
         height: 100vh; background: #f6f7f9; color: #1d2330; }
  header { display: flex; gap: 1em; align-items: center; padding: .6em 1em; background: #1d2330;
           color: white; flex-wrap: wrap; }
  header h1 { font-size: 1.05em; margin: 0; flex: 1; }
  header label { font-size: .85em; }
  #messages { flex: 1; overflow-y: auto; padding: 1em; }
  .msg { max-width: 46em; margin: .4em 0; padding: .55em .8em; border-radius: .6em;
         white-space: pre-wrap; line-height: 1.35; }
  .user { background: #d9e7ff; margin-left: auto; }
  .assistant { background: white; border: 1px solid #dde1e8; }
  #error { color: #a40000; background: #ffe9e9; padding: .5em 1em; display: none; }
  form { display: flex; gap: .5em; padding: .7em 1em; background: white;
         border-top: 1px solid #dde1e8; }
  textarea { flex: 1; font: inherit; padding: .5em; resize: vertical; min-height: 2.5em; }
  button { font: inherit; padding: .4em 1em; }
</style>
</head>
<body>
<header>
  <h1>gptjax chat &middot; __TITLE__ <small>(__CONTEXT__-token context)</small></h1>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1"
         value="0.8" style="width:4em"></label>
  <label>API key <input id="apikey" type="password" placeholder="if the server needs one"
         style="width:10em"></label>
  <button id="new-chat" type="button">New chat</button>
</header>
<div id="messages"></div>
<div id="error" role="alert"></div>
<form id="form">
  <textarea id="input" placeholder="Type a message; Enter sends, Shift+Enter breaks the line"
            required></textarea>
  <button id="send" type="submit">Send</button>
</form>
<script>
const MODEL = __MODEL__;
const CONTEXT = __CONTEXT__;
// The whole conversation (shown); the model is sent history.slice(first): like `chat`, the
// oldest exchanges are left out once the conversation outgrows the context.
let history = [];
let first = 0;
const $ = (id) => document.getElementById(id);

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function showError(message) {
  $("error").textContent = message;
  $("error").style.display = message ? "block" : "none";
}

async function send(text) {
  showError("");
  history.push({role: "user", content: text});
  bubble("user", text);
  const reply = bubble("assistant", "");
  $("send").disabled = true;
  const headers = {"Content-Type": "application/json"};
  if ($("apikey").value) headers["Authorization"] = "Bearer " + $("apikey").value;
  let answer = "";
  try {
    let response;
    for (;;) {
      response = await fetch("/v1/chat/completions", {method: "POST", headers,
        body: JSON.stringify({model: MODEL, messages: history.slice(first), stream: true,
                              max_tokens: Math.floor(CONTEXT / 2),
                              temperature: parseFloat($("temperature").value)})});
      if (response.ok) break;
      let error = {message: response.status + " " + response.statusText};
      try { error = (await response.json()).error; } catch (e) {}
      if (error.code === "context_length_exceeded" && first + 2 < history.length) {
        first += 2;  // Leave out the oldest exchange and ask again.
        continue;
      }
      throw new Error(error.message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(parsed.error.message);
        for (const choice of parsed.choices) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            reply.textContent = answer;
          }
        }
      }
    }
    history.push({role: "assistant", content: answer});
    reply.dataset.done = "true";
  } catch (e) {
    history.pop();
    first = Math.min(first, history.length);
    reply.remove();
    showError("Error: " + e.message);
  } finally {
    $("send").disabled = false;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || $("send").disabled) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("new-chat").addEventListener("click", () => {
  history = [];
  first = 0;
  $("messages").innerHTML = "";
  showError("");
});
</script>
</body>
</html>
"""


def html_page(model_name: str, context: int) -> str:
  """The page for a model."""
  return (_PAGE.replace("__TITLE__", html.escape(model_name))
          .replace("__CONTEXT__", str(context))
          .replace("__MODEL__", json.dumps(model_name).replace("<", "\\u003c")))
