"""The playground page served at `/`: one self-contained HTML document (no CDN, no build
step) that streams from this endpoint's own `/v1/completions` or `/v1/chat/completions`.

Kept as a Python string rather than a data file so that it ships in any install of the
package without package-data configuration.
"""

PLAYGROUND_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge playground</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 56rem; margin: 2rem auto;
         padding: 0 1rem; color: #1d1d1f; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  #model { color: #666; font-size: .9rem; }
  textarea { width: 100%; box-sizing: border-box; font: 14px/1.4 ui-monospace, monospace;
             min-height: 6rem; padding: .5rem; }
  fieldset { border: 1px solid #ddd; display: flex; flex-wrap: wrap; gap: .8rem 1.2rem;
             margin: .8rem 0; }
  label { display: flex; flex-direction: column; font-size: .85rem; color: #444; }
  input, select { font: inherit; width: 8rem; }
  button { font: inherit; padding: .4rem 1.2rem; cursor: pointer; }
  #output { white-space: pre-wrap; border: 1px solid #ddd; min-height: 6rem; padding: .6rem;
            margin-top: .8rem; font: 14px/1.4 ui-monospace, monospace; background: #fafafa; }
  #output .prompt { color: #888; }
  #status { color: #666; font-size: .85rem; margin-top: .4rem; min-height: 1.2em; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>lmforge playground</h1>
<div id="model">model: loading...</div>
<fieldset>
  <label>mode <select id="mode"><option value="completion">completion</option>
    <option value="chat">chat</option></select></label>
  <label>max_tokens <input id="max_tokens" type="number" min="1" value="32"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1"
    value="0.8"></label>
  <label>top_p <input id="top_p" type="number" min="0.01" max="1" step="0.05" value="1">
  </label>
  <label>top_k <input id="top_k" type="number" min="0" value="0"></label>
  <label>seed <input id="seed" type="number" placeholder="random"></label>
  <label>stop <input id="stop" type="text" placeholder="none"></label>
  <label>API key <input id="api_key" type="password" placeholder="if required"></label>
</fieldset>
<textarea id="prompt" placeholder="Type a prompt">The </textarea>
<div><button id="generate">Generate</button> <button id="stop_button" disabled>Stop</button>
</div>
<div id="output"></div>
<div id="status"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    $("model").textContent = r.ok ? "model: " + body.data[0].id
                                  : "model: " + body.error.message;
  } catch (e) { $("model").textContent = "model: unreachable"; }
}

function requestBody() {
  const chat = $("mode").value === "chat";
  const body = {stream: true, stream_options: {include_usage: true},
                max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value),
                top_p: Number($("top_p").value), top_k: Number($("top_k").value)};
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("stop").value !== "") body.stop = [$("stop").value];
  if (chat) body.messages = [{role: "user", content: $("prompt").value}];
  else body.prompt = $("prompt").value;
  return [chat ? "/v1/chat/completions" : "/v1/completions", body, chat];
}

async function generate() {
  const [url, body, chat] = requestBody();
  const out = $("output");
  out.textContent = "";
  if (!chat) {
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = body.prompt;
    out.appendChild(p);
  }
  const text = document.createTextNode("");
  out.appendChild(text);
  $("status").textContent = "waiting...";
  $("status").className = "";
  $("generate").disabled = true;
  $("stop_button").disabled = false;
  controller = new AbortController();
  const start = performance.now();
  let first = null, tokens = 0, finish = null;
  try {
    const r = await fetch(url, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                signal: controller.signal});
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = r.status + ": " + (await r.json()).error.message; } catch (e) {}
      throw new Error(msg);
    }
    // Server-sent events: "data: {json}" lines separated by blank lines, then [DONE].
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const c of chunk.choices) {
          const piece = chat ? (c.delta.content || "") : c.text;
          if (piece && first === null) first = performance.now();
          text.appendData(piece);
          if (c.finish_reason) finish = c.finish_reason;
        }
        $("status").textContent = "streaming...";
      }
    }
    const secs = (performance.now() - start) / 1000;
    const ttft = first === null ? "-" : ((first - start) / 1000).toFixed(3) + " s";
    $("status").textContent = `done (${finish}): ${tokens} tokens in ${secs.toFixed(2)} s, ` +
      `first token after ${ttft}`;
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
    $("status").className = e.name === "AbortError" ? "" : "error";
  } finally {
    $("generate").disabled = false;
    $("stop_button").disabled = true;
  }
}

$("generate").addEventListener("click", generate);
$("stop_button").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
$("api_key").addEventListener("change", loadModel);
loadModel();
</script>
</body>
</html>
"""
