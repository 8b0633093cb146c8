// The routing page of `modlora serve` (served at /; see src/modlora/serve/page.py).
// Every text from the server or the user is inserted with textContent (never as HTML); the page talks only to
// its own server: GET /v1/library, POST /v1/completions (stream, routing.per_token), GET /metrics.
"use strict";

const POLL_MS = 2000;
const MAX_COLUMNS = 3;
const state = {
  key: "",              // the API key the user typed (kept in memory only)
  library: null,        // the latest GET /v1/library
  colours: new Map(),   // expert -> colour, fixed on first sight so colours never move when experts are added
  metrics: null,        // the previous /metrics sample {time, values} (for rates)
};

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function setStatus(text) { $("status").textContent = text || ""; }

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

// ---------------------------------------------------------------------------------------------------- colours
function colourOf(expert) {
  if (!state.colours.has(expert)) {
    const i = state.colours.size;           // golden-angle hues: neighbours in order never look alike
    state.colours.set(expert, `hsl(${(i * 137.508) % 360}, 70%, ${i % 2 ? 80 : 72}%)`);
  }
  return state.colours.get(expert);
}

// ---------------------------------------------------------------------------------------------------- library
async function pollLibrary() {
  let resp;
  try {
    resp = await fetch("/v1/library", { headers: headers(false), cache: "no-store" });
  } catch (exc) {
    setStatus("server unreachable");
    return;
  }
  if (!resp.ok) {
    setStatus(resp.status === 401 ? "this server needs its API key" : await errorText(resp));
    return;
  }
  setStatus("");
  const lib = await resp.json();
  if (state.library && state.library.generation === lib.generation && state.library.library === lib.library) return;
  state.library = lib;
  for (const e of lib.experts) colourOf(e.name);
  renderLibrary(lib);
  renderPickers(lib);
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.round(n / 1024)} KiB`;
}

function renderLibrary(lib) {
  $("library-name").textContent = "· " + lib.library;
  const topk = lib.default_top_k === null ? "" : `, Arrow top-k ${lib.default_top_k}, T ${lib.default_temperature}`;
  $("library-meta").textContent =
    `(${lib.experts.length} experts, generation ${lib.generation}; router ${lib.default_router}${topk})`;
  const notes = [`routers served: ${lib.routers.join(", ")}`];
  if (lib.shared_expert) notes.push(`shared expert: ${lib.shared_expert} (${lib.share_mode}; not routed by default)`);
  const clusters = lib.experts.filter((e) => e.tasks.length > 1).length;
  if (clusters) notes.push(`${clusters} cluster experts (several tasks each)`);
  if (lib.skipped.length) notes.push(`not served: ${lib.skipped.join("; ")}`);
  $("library-notes").textContent = notes.join(" · ");
  const body = $("experts").tBodies[0];
  const rows = document.createDocumentFragment();
  for (const e of lib.experts) {
    const tr = document.createElement("tr");
    const name = el("td");
    const sw = el("span", null, "swatch");
    sw.style.background = colourOf(e.name);
    name.append(sw, document.createTextNode(e.name));
    if (e.name === lib.shared_expert) name.append(el("span", " (shared)", "muted"));
    const tasks = e.tasks.length > 4 ? `${e.tasks.slice(0, 4).join(", ")} (+${e.tasks.length - 4})` : e.tasks.join(", ");
    tr.append(name, el("td", tasks || "-"), el("td", e.rank ?? "-", "num"),
      el("td", e.parameters.toLocaleString("en"), "num"), el("td", fmtBytes(e.size_bytes), "num"),
      el("td", e.val_loss === null ? "-" : e.val_loss.toFixed(3), "num"), el("td", e.steps ?? "-", "num"));
    rows.append(tr);
  }
  body.replaceChildren(rows);
}

function modelChoices(lib) {
  const out = [];
  for (const r of lib.routers) out.push([`${lib.library}:${r}`, r === "mu" ? "μ (merged)" : r === "mu-delta" ? "μ-delta (mean ΔW)" : r]);
  for (const e of lib.experts) out.push([`${lib.library}:expert:${e.name}`, `expert ${e.name}`]);
  return out;
}

function renderPickers(lib) {
  const box = $("column-pickers");
  const old = [...box.querySelectorAll("select")].map((s) => s.value);
  const choices = modelChoices(lib);
  const ids = new Set(choices.map((c) => c[0]));
  const defaults = [`${lib.library}:arrow`, `${lib.library}:mu-delta`,
    lib.experts.length ? `${lib.library}:expert:${lib.experts[0].name}` : ""];
  box.replaceChildren();
  for (let c = 0; c < MAX_COLUMNS; c++) {
    const label = el("label", `router ${c + 1} `, "picker");
    const select = document.createElement("select");
    select.id = `router-${c}`;
    select.append(new Option("(none)", ""));
    for (const [id, text] of choices) select.append(new Option(text, id));
    const want = old[c] !== undefined ? old[c] : defaults[c];
    select.value = ids.has(want) ? want : (ids.has(defaults[c]) ? defaults[c] : "");
    label.append(select);
    box.append(label);
  }
  const k = el("label", "Arrow top-k ", "picker");
  const input = document.createElement("input");
  input.type = "number"; input.min = "1"; input.id = "top-k";
  input.value = document.getElementById("top-k")?.value || "";      // empty: the server's default
  if (lib.default_top_k !== null) input.placeholder = String(Math.min(lib.default_top_k, lib.experts.length));
  k.append(input);
  box.append(k);
}

// ---------------------------------------------------------------------------------------------------- playground
async function* sseEvents(resp) {
  // the JSON payloads of a text/event-stream body ("data: ..." lines; events end with a blank line)
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      yield JSON.parse(data);
    }
  }
}

function requestBody(model, prompt, maxTokens, topK) {
  const body = { model, prompt, max_tokens: maxTokens, temperature: 0, stream: true, routing: { per_token: true } };
  if (model.endsWith(":arrow") && topK) body.routing.top_k = topK;
  return body;
}

async function runColumn(column, model, prompt, maxTokens, topK) {
  const summary = column.querySelector(".summary");
  startColumn(column, prompt);
  let final = null;
  let chunks = 0;
  try {
    const resp = await fetch("/v1/completions", { method: "POST", headers: headers(true),
      body: JSON.stringify(requestBody(model, prompt, maxTokens, topK)) });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      chunks += 1;
      if (choice.finish_reason) { final = { reason: choice.finish_reason, routing: chunk.routing }; continue; }
      // a chunk before the last: its text, and the routing of the tokens read since the previous chunk
      addText(column, choice.text || "");
      if (chunk.routing && chunk.routing.tokens) colourTokens(column, chunk.routing.tokens, chunks);
    }
  } catch (exc) {
    summary.replaceChildren(el("span", String(exc.message || exc), "error"));
    return;
  }
  if (!final) { summary.replaceChildren(el("span", "the stream ended without a result", "error")); return; }
  column.dataset.chunks = String(chunks);
  finishColumn(column, final.routing, chunks);
  const ms = Number(column.dataset.renderMs).toFixed(1);
  const top = (final.routing && final.routing.top_experts || []).map((e) => `${e.expert} ${e.mass.toFixed(2)}`).join(", ");
  summary.textContent = `finish: ${final.reason}; ${column.tokens.length} tokens routed; ` +
    `overall: ${top || "-"}; entropy ${final.routing ? final.routing.entropy.toFixed(3) : "-"}; colours in ${ms} ms`;
}

// One column's output while its completion streams: the tokens coloured so far (column.tokens[i]: position,
// source, text, top_experts, entropy, layer_groups; span i carries data-i, and data-chunk, the number of the SSE
// chunk that brought its routing), then the prompt and completion text not routed yet, uncoloured. A generated
// token is routed when it is fed back to the model, so its routing comes with the next chunk; the last generated
// token is never fed back and stays uncoloured.
function startColumn(column, prompt) {
  const view = { prompt, text: "", promptRouted: "", completed: "", completionStarted: false, renderMs: 0,
    routed: el("span"), promptTail: el("span", prompt, "streaming"), tail: el("span", null, "streaming") };
  column.view = view;
  column.tokens = [];
  column.counts = new Map();                                // top expert (or TIE) -> tokens it won, for the legend
  column.querySelector(".note").textContent = "";
  column.querySelector(".tokens").replaceChildren(view.routed, view.promptTail, view.tail);
}

function addText(column, text) {
  if (!text) return;
  column.view.text += text;
  updateTails(column.view);
}

// The text not routed yet: what follows the routed tokens' pieces (none when the pieces are not its beginning,
// e.g. a prompt read with a begin-of-sequence token).
function updateTails(view) {
  const rest = (all, routed) => (all.startsWith(routed) ? all.slice(routed.length) : "");
  const anyPrompt = view.promptRouted !== "" || view.completionStarted;
  view.promptTail.textContent = anyPrompt ? rest(view.prompt, view.promptRouted) : view.prompt;
  view.tail.textContent = rest(view.text, view.completed);
  view.tail.classList.toggle("completion-start", !view.completionStarted && view.tail.textContent !== "");
}

function colourTokens(column, tokens, chunk) {
  const start = performance.now();
  const view = column.view;
  const frag = document.createDocumentFragment();
  for (const t of tokens) {
    const span = el("span", t.text, "tok");
    span.dataset.i = String(column.tokens.length);
    span.dataset.chunk = String(chunk);
    column.tokens.push(t);
    const top = topExpert(t);
    span.dataset.expert = top || "";
    if (top === TIE) span.classList.add("tie");
    else span.style.background = top ? colourOf(top) : "var(--unrouted)";
    if (top) column.counts.set(top, (column.counts.get(top) || 0) + 1);
    if (t.source === "completion") {
      view.completed += t.text;
      if (!view.completionStarted) { span.classList.add("completion-start"); view.completionStarted = true; }
    } else {
      view.promptRouted += t.text;
    }
    frag.append(span);
  }
  view.routed.append(frag);
  updateTails(view);
  void view.routed.offsetHeight;                          // include the layout in the measured time
  view.renderMs += performance.now() - start;
  renderLegend();
}

// The end of a column's stream: the final chunk's summary (routing.tokens: every token's routing again) colours
// whatever the chunks before did not bring; the text never routed is marked as such.
function finishColumn(column, routing, chunk) {
  const view = column.view;
  const tokens = (routing && routing.tokens) || [];
  if (tokens.length > column.tokens.length) colourTokens(column, tokens.slice(column.tokens.length), chunk);
  if (!column.tokens.length) {
    column.querySelector(".note").textContent = routing && routing.merged_experts
      ? `${routing.router} merges ${routing.merged_experts.length} experts into one adapter: no per-token routing`
      : "no routing (no experts applied)";
  }
  for (const tail of [view.promptTail, view.tail]) {
    tail.classList.remove("streaming");
    if (column.tokens.length && tail.textContent) { tail.classList.add("unrouted"); tail.dataset.unrouted = "1"; }
  }
  column.dataset.renderMs = String(view.renderMs);
  renderLegend();
}

// Colour one column at once from a whole response's per-token telemetry (used by benchmarks/page_render.py).
function renderCompletion(column, prompt, text, routing) {
  startColumn(column, prompt);
  addText(column, text);
  finishColumn(column, routing, 0);
}

// The expert with the largest routing mass of a token; TIE when the two largest are equal (e.g. μ-delta's uniform
// weights), null when no expert was applied.
const TIE = "=";
function topExpert(token) {
  const [first, second] = token.top_experts;
  if (!first) return null;
  return second && first.mass - second.mass < 1e-6 ? TIE : first.expert;
}

function renderLegend() {
  const counts = new Map();
  for (const column of document.querySelectorAll(".column")) {
    for (const [top, n] of column.counts || []) counts.set(top, (counts.get(top) || 0) + n);
  }
  const frag = document.createDocumentFragment();
  for (const [name, n] of [...counts.entries()].sort((a, b) => b[1] - a[1])) {
    if (name === TIE) continue;
    const item = el("span", null, "legend-item");
    item.dataset.expert = name;
    const sw = el("span", null, "swatch");
    sw.style.background = colourOf(name);
    item.append(sw, document.createTextNode(`${name} (${n})`));
    frag.append(item);
  }
  for (const [cls, text] of [["tie", `tie: equal top weights (${counts.get(TIE) || 0})`], ["unrouted", "not routed"]]) {
    const item = el("span", null, "legend-item");
    item.append(el("span", null, `swatch ${cls}`), document.createTextNode(text));
    frag.append(item);
  }
  $("legend").replaceChildren(frag);
}

function showTooltip(token, span) {
  const tip = $("tooltip");
  const table = document.createElement("table");
  const head = (text) => { const tr = el("tr", null, "group"); const th = el("th", text); th.colSpan = 2; tr.append(th); return tr; };
  const row = (name, mass) => { const tr = el("tr", null, "weight"); tr.dataset.expert = name; tr.dataset.mass = String(mass);
    const sw = el("span", null, "swatch"); sw.style.background = colourOf(name); const td = el("td"); td.append(sw, document.createTextNode(name));
    tr.append(td, el("td", mass.toFixed(3), "num")); return tr; };
  const label = JSON.stringify(token.text);
  table.append(head(`token ${label} (${token.source}, position ${token.position}) · entropy ${token.entropy.toFixed(3)}`));
  for (const e of token.top_experts) table.append(row(e.expert, e.mass));
  for (const g of token.layer_groups) {
    const h = head(`layers ${g.layers} · entropy ${g.entropy.toFixed(3)}`);
    h.dataset.layers = g.layers;
    table.append(h);
    for (const e of g.top_experts) { const r = row(e.expert, e.mass); r.dataset.layers = g.layers; table.append(r); }
  }
  tip.replaceChildren(table);
  const box = span.getBoundingClientRect();
  tip.style.left = `${Math.min(window.scrollX + box.left, window.scrollX + document.documentElement.clientWidth - 320)}px`;
  tip.style.top = `${window.scrollY + box.bottom + 4}px`;
  tip.hidden = false;
}

function onHover(event) {
  const span = event.target.closest && event.target.closest(".tok");
  const column = span && span.closest(".column");
  if (!span || !column || !column.tokens) { $("tooltip").hidden = true; return; }
  showTooltip(column.tokens[Number(span.dataset.i)], span);
}

async function run(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  const maxTokens = Number($("max-tokens").value) || 16;
  const topK = Number($("top-k") && $("top-k").value) || null;
  const models = [...document.querySelectorAll("#column-pickers select")].map((s) => s.value).filter(Boolean);
  const columns = $("columns");
  columns.replaceChildren();
  $("tooltip").hidden = true;
  const runs = models.map((model) => {
    const column = el("div", null, "column");
    column.dataset.model = model;
    column.append(el("h3", model), el("p", null, "note muted"), el("div", null, "tokens"), el("p", null, "summary"));
    columns.append(column);
    return runColumn(column, model, prompt, maxTokens, topK);
  });
  $("run").disabled = true;
  await Promise.all(runs);
  $("run").disabled = false;
  document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
}

// ---------------------------------------------------------------------------------------------------- /metrics
function parseMetrics(text) {
  // Prometheus text format: "name{labels} value [timestamp]"; the modlora_ series only, histogram buckets left out
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line.startsWith("modlora_")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!m || m[1].endsWith("_bucket") || m[1].endsWith("_created")) continue;
    out.set(m[1] + (m[2] || ""), Number(m[3]));
  }
  return out;
}

function headline(values) {
  // queue, batch size, tokens/s and mean time to first token, where the server reports them
  const v = (name) => values.get(name);
  const parts = [];
  if (v("modlora_requests_waiting") !== undefined) parts.push(`queue ${v("modlora_requests_waiting")}`);
  if (v("modlora_requests_running") !== undefined) parts.push(`batch ${v("modlora_requests_running")}`);
  if (v("modlora_generation_tokens_per_second") !== undefined) {
    parts.push(`${v("modlora_generation_tokens_per_second").toFixed(1)} tokens/s`);
  }
  const n = v("modlora_time_to_first_token_seconds_count");
  if (n) parts.push(`time to first token ${(1000 * v("modlora_time_to_first_token_seconds_sum") / n).toFixed(0)} ms (mean)`);
  return parts.join(" · ");
}

async function pollMetrics() {
  let resp;
  try { resp = await fetch("/metrics", { headers: headers(false), cache: "no-store" }); } catch (_) { return; }
  const note = $("stats-note");
  const body = $("stats").tBodies[0];
  if (resp.status === 404) { note.textContent = "this server has no /metrics"; body.replaceChildren(); return; }
  if (!resp.ok) { note.textContent = await errorText(resp); return; }
  const now = performance.now();
  const values = parseMetrics(await resp.text());
  const prev = state.metrics;
  state.metrics = { time: now, values };
  note.textContent = values.size ? "rates are per second since the previous sample (every 2 s)" : "no modlora_ series yet";
  $("stats-headline").textContent = headline(values);
  const rows = document.createDocumentFragment();
  const perExpert = [...values.entries()].filter(([s]) => s.includes('{expert="'));
  const shown = perExpert.sort((a, b) => b[1] - a[1]).slice(0, 8).map(([s]) => s);    // the 8 largest per-expert series
  for (const [series, value] of values) {
    if (series.includes('{expert="') && !shown.includes(series)) continue;
    const tr = document.createElement("tr");
    let rate = "";
    if (prev && series.split("{")[0].endsWith("_total") && prev.values.has(series)) {
      rate = `${((value - prev.values.get(series)) / ((now - prev.time) / 1000)).toFixed(2)}/s`;
    }
    tr.append(el("td", series), el("td", Number.isInteger(value) ? value : value.toFixed(4), "num"), el("td", rate, "num"));
    rows.append(tr);
  }
  body.replaceChildren(rows);
}

// ---------------------------------------------------------------------------------------------------- start
function start() {
  $("playground").addEventListener("submit", run);
  $("columns").addEventListener("mouseover", onHover);
  $("columns").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  $("api-key").addEventListener("change", (e) => { state.key = e.target.value.trim(); state.library = null; pollLibrary(); pollMetrics(); });
  pollLibrary();
  pollMetrics();
  setInterval(pollLibrary, POLL_MS);
  setInterval(pollMetrics, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
