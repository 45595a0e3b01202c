// lmadapt ui: fills the pages from the JSON API. Text from runs is set as textContent, never as
// HTML; the one exception, the report, is rendered and sanitised by the server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const PLOT = { responsive: true, displaylogo: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : r.statusText);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return v.toLocaleString("en");
    return Math.abs(v) >= 100 ? v.toFixed(1) : String(parseFloat(v.toPrecision(4)));
  }
  return String(v);
}

const runLink = (id) => el("a", { href: "/run?id=" + encodeURIComponent(id), text: id });

function statusCell(row) {
  const td = el("td", { class: "status " + (row.status || "bad"), text: row.status || "bad" });
  if (row.hint) td.append(el("div", { class: "hint", text: row.hint }));
  if (row.problems && row.problems.length) td.append(el("div", { class: "hint", text: row.problems.join("; ") }));
  if (row.status === "running" && row.progress) {
    const p = row.progress;
    const of = p.max_steps ? ` / ${p.max_steps} steps` : ` (epoch ${fmt((p.epoch ?? 0) + 1)} of ${fmt(p.epochs)})`;
    td.append(el("div", { class: "hint progress", text: `step ${fmt(p.step)}${of}, loss ${fmt(p.loss)}` }));
  }
  return td;
}

// ---------------------------------------------------------------------- runs page

function runsPage() {
  let rows = [], sortKey = "id", sortDir = 1;
  const selected = new Set();
  const body = $("#runs tbody");
  const button = $("#compare-selected");

  function render() {
    const q = $("#filter").value.toLowerCase();
    const shown = rows
      .filter((r) => !q || ["id", "kind", "task", "method", "model", "status"].some((k) => String(r[k] ?? "").toLowerCase().includes(q)))
      .sort((a, b) => {
        const x = a[sortKey], y = b[sortKey];
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * sortDir;
      });
    body.replaceChildren(...shown.map((r) => {
      const box = el("input", { type: "checkbox", onchange: (e) => { e.target.checked ? selected.add(r.id) : selected.delete(r.id); update(); } });
      box.checked = selected.has(r.id);
      const score = r.best ?? r.latest;
      const best = score === undefined || score === null ? "" : `${fmt(score)} ${r.metric || ""}${r.best == null ? " (latest)" : ""}`;
      return el("tr", { "data-id": r.id, "data-status": r.status || "bad" },
        el("td", {}, box), el("td", {}, runLink(r.id)), el("td", { text: r.kind }),
        el("td", { text: fmt(r.task) }), el("td", { text: fmt(r.method) }), el("td", { class: "model", text: fmt(r.model) }),
        statusCell(r), el("td", { text: best }), el("td", { class: "num", text: fmt(r.trainable_params) }),
        el("td", { class: "num", text: fmt(r.wall_seconds) }));
    }));
    $("#count").textContent = `${shown.length} of ${rows.length} runs`;
  }
  function update() { button.disabled = selected.size < 2; }

  document.querySelectorAll("#runs th[data-key]").forEach((th) => th.addEventListener("click", () => {
    sortDir = sortKey === th.dataset.key ? -sortDir : 1;
    sortKey = th.dataset.key;
    render();
  }));
  $("#filter").addEventListener("input", render);
  button.addEventListener("click", () => {
    location.href = "/compare?" + [...selected].map((id) => "id=" + encodeURIComponent(id)).join("&");
  });

  async function poll() {
    const running = rows.filter((r) => r.status === "running").map((r) => "id=" + encodeURIComponent(r.id));
    if (running.length) {
      const fresh = await getJSON("/api/progress?" + running.join("&")).catch(() => []);
      for (const f of fresh) rows[rows.findIndex((r) => r.id === f.id)] = f;
      render();
    }
  }
  getJSON("/api/runs").then((r) => { rows = r; render(); setInterval(poll, 3000); })
    .catch((e) => { $("#count").textContent = "could not list runs: " + e.message; });
}

// ---------------------------------------------------------------------- run page

function lineTraces(series, prefix = "") {
  return Object.entries(series).map(([name, [x, y]]) => ({ x, y, name: prefix + name, mode: "lines+markers", type: "scatter" }));
}

function heatmap(div, title, z, x, y, xtitle, ytitle) {
  Plotly.newPlot(div, [{ z, x, y, type: "heatmap", colorscale: "Blues", reversescale: true, texttemplate: "%{z}", hovertemplate: `${ytitle} %{y}<br>${xtitle} %{x}<br>%{z}<extra></extra>` }],
    { title: { text: title }, xaxis: { title: { text: xtitle } }, yaxis: { title: { text: ytitle }, autorange: "reversed" }, height: 380 }, PLOT);
}

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", { text: fmt(c) }))))));
}

function drawCurves(d) {
  const c = d.curves;
  if (!c) { $("#curves-section").hidden = true; return; }  // hpo, continual: no log of their own
  const loss = lineTraces({ "train loss": c.train.loss || [[], []] });
  if (c.dev.loss) loss.push(...lineTraces({ "dev loss": c.dev.loss }));
  Plotly.react("loss-plot", loss, { title: { text: "loss" }, xaxis: { title: { text: "step" } }, height: 340 }, PLOT);
  const dev = Object.fromEntries(Object.entries(c.dev).filter(([k]) => k !== "loss"));
  Plotly.react("metric-plot", lineTraces(dev, "dev "), { title: { text: "dev metrics" }, xaxis: { title: { text: "step" } }, height: 340 }, PLOT);
}

const REWARD_COLUMNS = [["reward accuracy", "reward_accuracy"], ["reward margin", "reward_margin"], ["chosen reward", "chosen_reward"],
  ["rejected reward", "rejected_reward"], ["logp accuracy", "logp_accuracy"]];

function drawRewards(rewards, curves) {
  // a preference run: each split's rewards, the untrained model's beside the trained one's, and the
  // dev reward margin over training (the base model's is a constant, dashed)
  const box = $("#rewards");
  box.append(el("h2", { text: "Preference: trained vs base model" }),
    table(["split", "model", ...REWARD_COLUMNS.map(([name]) => name)], rewards.flatMap((r) => [
      [r.split, "base (untrained)", ...REWARD_COLUMNS.map(([, k]) => r.base[k])],
      [r.split, "trained", ...REWARD_COLUMNS.map(([, k]) => r.trained[k])]])));
  const dev = curves ? curves.dev : {};
  if (!dev.reward_margin) return;
  const traces = lineTraces({ "dev reward margin": dev.reward_margin });
  if (dev.base_reward_margin) traces.push(...lineTraces({ "base model": dev.base_reward_margin }).map((t) => ({ ...t, mode: "lines", line: { dash: "dash" } })));
  const div = el("div", { class: "plot", id: "margin-plot" });
  box.append(div);
  Plotly.newPlot(div, traces, { title: { text: "reward margin (chosen - rejected) over training" }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "margin" } }, height: 340 }, PLOT);
}

async function runPage() {
  const id = document.body.dataset.entry;
  const d = await getJSON("/api/run?id=" + encodeURIComponent(id)).catch((e) => ({ summary: { problems: [e.message] } }));
  const s = d.summary;
  const facts = [["kind", s.kind], ["status", s.status], ["task", s.task], ["method", s.method], ["model", s.model],
    ["best dev " + (s.metric || ""), s.best], ["latest dev " + (s.metric || ""), s.latest], ["trainable params", s.trainable_params], ["total params", s.total_params],
    ["wall seconds", s.wall_seconds], ["samples/s", s.samples_per_second], ["resume with", s.hint]].filter(([, v]) => v !== undefined && v !== null);
  $("#summary").replaceChildren(el("dl", {}, ...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmt(v) })])));
  $("#problems").replaceChildren(...(s.problems || []).map((p) => el("li", { text: p })));
  if (s.kind !== "run" || s.status !== "finished") $("#try").hidden = true;
  drawCurves(d);
  for (const [i, cm] of (d.confusion || []).entries()) {
    const div = el("div", { class: "plot", id: "confusion-" + i });
    $("#confusion").append(div);
    heatmap(div, "confusion matrix: " + cm.title, cm.matrix, cm.labels, cm.gold, "predicted", "gold");
  }
  if (d.rewards && d.rewards.length) drawRewards(d.rewards, d.curves);
  if (d.continual) {
    const c = d.continual;
    const div = el("div", { class: "plot", id: "continual-plot" });
    $("#continual").append(el("h2", { text: "Continual learning: accuracy matrix" }), div);
    heatmap(div, `R[i][j], strategy ${c.strategy}`, c.matrix, c.tasks, c.steps.map((st) => `${st.step}: ${st.task}`), "evaluated task", "after step");
  }
  if (d.trials) {
    const t = d.trials;
    const div = el("div", { class: "plot", id: "trials-plot" });
    $("#trials").append(el("h2", { text: "HPO trials" }), div,
      table(["trial", "state", t[0] ? t[0].metric : "value", "params"], t.map((r) => [r.number, r.state, r.value, JSON.stringify(r.params)])));
    const traces = t.filter((r) => r.intermediate.length).map((r) => ({ x: r.intermediate.map((p) => p[0]), y: r.intermediate.map((p) => p[1]), name: `trial ${r.number} (${r.state.toLowerCase()})`, mode: "lines+markers" }));
    Plotly.newPlot(div, traces, { title: { text: "dev metric at each evaluation" }, xaxis: { title: { text: "step" } }, height: 340 }, PLOT);
  }
  $("#report").innerHTML = d.report_html || "<p class='small'>no report (yet)</p>";
  $("#config").textContent = d.config || "no config.yaml";
  if (s.status === "running") setTimeout(() => location.reload(), 5000);
}

// ---------------------------------------------------------------------- compare page

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, prefix + k + ".", out);
    else out[prefix + k] = JSON.stringify(v);
  }
  return out;
}

async function comparePage() {
  const ids = JSON.parse(document.body.dataset.entries);
  if (ids.length < 2) return;
  $("#pick").hidden = true;
  const runs = await Promise.all(ids.map((id) => getJSON("/api/run?id=" + encodeURIComponent(id))));
  const loss = [], metric = [];
  runs.forEach((d, i) => {
    const c = d.curves;
    if (!c) return;
    if (c.train.loss) loss.push(...lineTraces({ [ids[i]]: c.train.loss }));
    const m = d.summary.metric && c.dev[d.summary.metric] ? d.summary.metric : Object.keys(c.dev).find((k) => k !== "loss");
    if (m) metric.push(...lineTraces({ [`${ids[i]} (${m})`]: c.dev[m] }));
  });
  Plotly.newPlot("overlay-loss", loss, { title: { text: "train loss" }, xaxis: { title: { text: "step" } }, height: 340 }, PLOT);
  Plotly.newPlot("overlay-metric", metric, { title: { text: "dev metric" }, xaxis: { title: { text: "step" } }, height: 340 }, PLOT);

  const dev = [...new Set(runs.flatMap((d) => Object.keys((d.metrics || {}).dev || {})))];
  const facts = [["task", (d) => d.summary.task], ["method", (d) => d.summary.method], ["model", (d) => d.summary.model],
    ["status", (d) => d.summary.status], ["trainable params", (d) => d.summary.trainable_params], ["total params", (d) => d.summary.total_params],
    ...dev.map((k) => ["dev " + k, (d) => ((d.metrics || {}).dev || {})[k]]),
    ["train seconds", (d) => (d.metrics || {}).train_seconds], ["wall seconds", (d) => d.summary.wall_seconds],
    ["samples/s", (d) => (d.metrics || {}).samples_per_second], ["peak RSS MB", (d) => (d.metrics || {}).peak_rss_mb]];
  $("#side").replaceChildren(...table(["", ...ids], facts.map(([name, get]) => [name, ...runs.map(get)])).childNodes);

  const flat = runs.map((d) => flatten(d.config_data));
  const keys = [...new Set(flat.flatMap(Object.keys))].sort().filter((k) => new Set(flat.map((f) => f[k])).size > 1);
  $("#diff").replaceChildren(...table(["config key", ...ids], keys.map((k) => [k, ...flat.map((f) => f[k] ?? "—")])).childNodes);
}

// ---------------------------------------------------------------------- playground

function highlight(text, spans, label, color, tag) {
  // spans: [{start, end, ...}]; label(span): the tooltip, color(span): the background,
  // tag(span): a short name shown after the span (optional)
  const out = el("p", { class: "highlighted" });
  let at = 0;
  for (const s of [...spans].sort((a, b) => a.start - b.start)) {
    if (s.start < at) continue;
    out.append(text.slice(at, s.start));
    const mark = el("mark", { title: label(s), style: "background:" + color(s) }, text.slice(s.start, s.end));
    if (tag) mark.append(el("sub", { text: " " + tag(s) }));
    out.append(mark);
    at = s.end;
  }
  out.append(text.slice(at));
  return out;
}

async function streamChat(card, text, out) {
  const t = $("#temperature").value;
  const decoding = t === "" ? {} : { temperature: Number(t) };
  const r = await fetch("/serve/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: card.name, messages: [{ role: "user", content: text }], stream: true, ...decoding }),
  });
  if (!r.ok) {  // an OpenAI route answers {"error": {"message", ...}}; the dashboard {"detail"}
    const body = await r.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || body.detail || r.statusText);
  }
  const answer = el("p", { class: "answer" });
  out.replaceChildren(answer);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    const events = buf.split("\n\n");
    buf = events.pop();
    for (const ev of events) {
      const data = ev.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      answer.textContent += choice.delta.content || "";
      if (choice.finish_reason) answer.dataset.finish = choice.finish_reason;
    }
  }
}

async function playgroundPage() {
  const select = $("#run-select");
  let card = null;
  const rows = (await getJSON("/api/runs")).filter((r) => r.kind === "run" && r.status === "finished");
  select.replaceChildren(...rows.map((r) => el("option", { value: r.id, text: `${r.id} (${r.task}, ${r.method})` })));
  if (document.body.dataset.entry) select.value = document.body.dataset.entry;

  function show(c) {
    card = c;
    $("#loaded").textContent = `loaded ${c.id}: ${c.task} via /v1/${c.endpoint}`;
    $("#try").hidden = false;
    $("#explain-box").hidden = c.endpoint !== "classify" && c.endpoint !== "ner";
    $("#qa-context-box").hidden = c.endpoint !== "qa";
    $("#temperature-box").hidden = c.endpoint !== "generate";
    $("#output").replaceChildren();
  }
  $("#load").addEventListener("click", async () => {
    $("#loaded").textContent = "loading…";
    try { show(await getJSON("/api/playground", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id: select.value }) })); }
    catch (e) { $("#loaded").textContent = "could not load: " + e.message; }
  });
  const current = await getJSON("/api/playground").catch(() => null);
  if (current) show(current);

  const post = (path, body) => getJSON("/serve" + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ model: card.name, ...body }) });
  $("#go").addEventListener("click", async () => {
    const text = $("#input").value, out = $("#output");
    out.replaceChildren(el("p", { class: "small", text: "…" }));
    try {
      if (card.endpoint === "classify") {
        const row = (await post("/v1/classify", { texts: [text] })).results[0];
        const probs = row.probabilities || {};
        const labels = Object.keys(probs);
        const div = el("div", { class: "plot", id: "probs-plot" });
        out.replaceChildren(el("p", { class: "prediction", text: "label: " + [row.label].flat().join(", ") }), div);
        Plotly.newPlot(div, [{ type: "bar", x: labels.map((l) => probs[l]), y: labels, orientation: "h" }], { title: { text: "probabilities" }, xaxis: { range: [0, 1] }, margin: { l: 120 }, height: 160 + 40 * labels.length }, PLOT);
      } else if (card.endpoint === "ner") {
        const row = (await post("/v1/ner", { texts: [text] })).results[0];
        out.replaceChildren(el("p", { class: "prediction", text: `${row.entities.length} entities` }),
          highlight(text, row.entities, (e) => `${e.type} ${fmt(e.score)}`, () => "#ffe08a", (e) => e.type));
      } else if (card.endpoint === "qa") {
        const row = (await post("/v1/qa", { items: [{ question: text, context: $("#qa-context").value }] })).results[0];
        out.replaceChildren(el("pre", { class: "prediction", text: JSON.stringify(row, null, 2) }));
      } else {
        await streamChat(card, text, out);
      }
      if ($("#explain").checked && !$("#explain-box").hidden) {
        const ex = (await post("/v1/explain", { texts: [text] })).results[0];
        for (const e of ex.explanations) {
          const top = Math.max(1e-12, ...e.words.map((w) => Math.abs(w.score)));
          const about = Object.entries(e).filter(([k]) => !["words", "delta"].includes(k)).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
          out.append(el("h3", { text: "attributions: " + about }),
            highlight(text, e.words, (w) => fmt(w.score), (w) => `rgba(${w.score >= 0 ? "0,150,0" : "220,0,0"},${(Math.abs(w.score) / top).toFixed(3)})`));
        }
      }
    } catch (e) {
      out.replaceChildren(el("p", { class: "error", text: e.message }));
    }
  });
}

const PAGES = { runs: runsPage, run: runPage, compare: comparePage, playground: playgroundPage };
document.addEventListener("DOMContentLoaded", () => PAGES[document.body.dataset.page]());
