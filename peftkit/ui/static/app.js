// peftkit ui: a thin page over the JSON API of peftkit/ui/server.py. No framework, no network
// beyond this server.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

async function api(path, body) {
  const headers = {};
  if (TOKEN) headers["X-Peftkit-Token"] = TOKEN;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function fileUrl(rel) {
  const q = new URLSearchParams({ path: rel });
  if (TOKEN) q.set("token", TOKEN);
  return "api/file?" + q;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

const fmt = {
  int: (n) => (n == null ? "n/a" : Math.round(n).toLocaleString("en-US")),
  num: (n, d = 4) => (n == null ? "n/a" : Number(n).toFixed(d)),
  bytes: (b) => (b == null ? "n/a" : b >= 2 ** 30 ? (b / 2 ** 30).toFixed(2) + " GiB" : (b / 2 ** 20).toFixed(1) + " MiB"),
  secs: (s) => (s == null ? "n/a" : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${s.toFixed(1)} s`),
};

// ---- tabs ----
function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === name);
  if (name === "runs") loadRuns();
  if (name === "try") loadAdapters();
}

// ---- a line chart on a canvas: series = [{label, points: [[x, y], ...]}] ----
function lineChart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 56, R = 12, T = 12, B = 34;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap((s) => s.points);
  canvas.dataset.points = pts.length;
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#6b7280";
  if (!pts.length) { ctx.fillText("no loss logged yet", W / 2 - 50, H / 2); return; }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#e5e7eb";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4, x = x0 + ((x1 - x0) * i) / 4;
    ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(W - R, Y(y)); ctx.stroke();
    ctx.fillText(y.toPrecision(3), 4, Y(y) + 4);
    ctx.fillText(Math.round(x), X(x) - 8, H - B + 16);
  }
  ctx.fillText("step", W - R - 28, H - 4);
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color || COLORS[i % COLORS.length];
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([x, y], j) => (j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.points.length === 1) ctx.fillRect(X(s.points[0][0]) - 2, Y(s.points[0][1]) - 2, 5, 5);
    ctx.fillText(s.label, W - R - 160, T + 14 + 16 * i);
  });
}

// ---- Plan ----
function settings() {
  const out = {};
  for (const input of document.querySelectorAll("[data-setting]")) {
    const key = input.dataset.setting;
    if (input.closest("fieldset")?.hidden) continue;
    out[key] = input.type === "checkbox" ? input.checked : input.value.trim();
  }
  return out;
}

let planSeq = 0, planTimer = null;
function schedulePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(runPlan, 600);
}

async function runPlan() {
  const seq = ++planSeq;
  $("plan-state").textContent = "planning…";
  try {
    const plan = await api("api/plan", { settings: settings() });
    if (seq === planSeq) showPlan(plan);
  } catch (err) {
    if (seq === planSeq) { $("plan-error").textContent = err.message; $("plan-state").textContent = ""; }
  }
}

function showPlan(plan) {
  $("plan-state").textContent = "";
  $("command").textContent = plan.command || "";
  $("run-error").textContent = plan.command_error || "";
  $("start").disabled = !plan.command;
  const est = plan.estimate.result;
  $("plan-error").textContent = plan.estimate.error || "";
  $("trainable").textContent = est
    ? `trainable params: ${fmt.int(est.trainable_params)} || all params: ${fmt.int(est.all_params)} || trainable%: ${est.trainable_percent.toFixed(4)}`
    : "";
  const table = $("memory");
  table.replaceChildren();
  if (est) {
    const b = est.bytes, s = est.settings;
    table.append(el("caption", {}, `memory plan: batch ${s.batch_size} x ${s.seq_len} tokens, ${s.dtype}, ${s.optimizer}`));
    const rows = [
      ...Object.entries(b.weights).map(([k, v]) => [`weights ${k}`, v]),
      ["gradients", b.gradients], ["optimizer states", b.optimizer_states],
      ["activations", b.activations], ["loss", b.logits],
    ];
    if (b.dequantized_weight) rows.push(["dequant buffer", b.dequantized_weight]);
    for (const [k, v] of rows) table.append(el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt.bytes(v))));
    table.append(el("tr", { class: "total" }, el("td", {}, "total (peak)"), el("td", { class: "num" }, fmt.bytes(b.total))));
  }
  const doctor = $("doctor");
  doctor.replaceChildren();
  if (plan.doctor.error) doctor.append(el("li", { class: "error" }, plan.doctor.error));
  else if (!plan.doctor.result.length) doctor.append(el("li", { class: "ok" }, "no findings: the configuration follows the usual practice"));
  for (const f of plan.doctor.result || []) {
    doctor.append(el("li", { class: f.severity }, el("b", {}, `${f.severity}: ${f.check}. `), f.reason,
      el("div", { class: "muted" }, "fix: " + f.fix)));
  }
}

function toggleMethodFields() {
  $("lora-fields").hidden = !["lora", "qlora"].includes($("method").value);
}

// ---- Run ----
let current = null, pollTimer = null;

async function startRun() {
  $("run-error").textContent = "";
  $("start").disabled = true;
  try {
    const started = await api("api/runs", { settings: settings() });
    $("command").textContent = started.command;
    watch(started.run);
  } catch (err) {
    $("run-error").textContent = err.message;
    $("start").disabled = false;
  }
}

function watch(run) {
  current = run;
  clearTimeout(pollTimer);
  poll();
}

async function poll() {
  if (!current) return;
  let run;
  try {
    run = await api("api/run?run=" + encodeURIComponent(current));
  } catch (err) {
    $("run-error").textContent = err.message;
    pollTimer = setTimeout(poll, 2000);
    return;
  }
  const live = run.status === "running" || run.status === "starting";
  $("run-status").textContent = `${run.name}: ${run.status}`;
  $("run-status").className = "badge " + run.status;
  $("stop").disabled = !live || !run.command;
  $("start").disabled = live;
  if (run.error) $("run-error").textContent = run.error;
  const p = run.progress;
  const stats = [
    ["step", p.max_steps ? `${p.step} / ${p.max_steps}` : p.step],
    ["tokens/s", p.tokens_per_s == null ? "n/a" : p.tokens_per_s.toFixed(0)],
    ["elapsed", fmt.secs(p.elapsed_s)],
    ["remaining", live ? fmt.secs(p.remaining_s) : "—"],
    [p.memory_kind === "peak" ? "peak memory" : "memory", p.memory_mb == null ? "n/a" : `${p.memory_mb.toFixed(0)} MiB`],
    ["last loss", run.loss.length ? run.loss[run.loss.length - 1][1].toFixed(4) : "n/a"],
  ];
  $("progress").replaceChildren(...stats.map(([k, v]) => el("div", { class: "stat" }, el("span", { class: "muted" }, k), el("b", { "data-stat": k }, v))));
  const series = [{ label: "train loss", points: run.loss }];
  if (run.eval_loss.length) series.push({ label: "eval loss", points: run.eval_loss });
  lineChart($("live-chart"), series);
  $("log").textContent = run.log.join("\n");
  if (live) pollTimer = setTimeout(poll, 1000);
}

async function stopRun() {
  $("stop").disabled = true;
  try {
    await api("api/stop", { run: current });
  } catch (err) {
    $("run-error").textContent = err.message;
  }
}

// ---- Runs ----
let runsTimer = null;
async function loadRuns() {
  clearTimeout(runsTimer);
  let data;
  try { data = await api("api/runs"); } catch (err) { $("runs-table").replaceChildren(el("tr", {}, el("td", { class: "error" }, err.message))); return; }
  const picked = new Set([...document.querySelectorAll(".pick:checked")].map((c) => c.value));
  const head = el("tr", {}, ...["", "run", "status", "method", "steps", "train loss", "exact match", "trainable %", "wall time", "peak memory"].map((h) => el("th", {}, h)));
  const rows = data.runs.map((r) => {
    const m = r.final_metrics || {};
    const box = el("input", { type: "checkbox", class: "pick", value: r.name });
    box.checked = picked.has(r.name);
    box.addEventListener("change", () => { $("compare").disabled = document.querySelectorAll(".pick:checked").length < 2; });
    return el("tr", { "data-run": r.name },
      el("td", {}, box),
      el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); showRun(r.name); } }, r.name)),
      el("td", {}, el("span", { class: "badge " + r.status }, r.status)),
      el("td", {}, r.method ?? ""), el("td", { class: "num" }, r.steps ?? ""),
      el("td", { class: "num" }, m.train_loss == null ? "" : fmt.num(m.train_loss)),
      el("td", { class: "num" }, m.test_exact_match == null ? "" : fmt.num(m.test_exact_match, 2)),
      el("td", { class: "num" }, r.trainable_percent == null ? "" : fmt.num(r.trainable_percent)),
      el("td", { class: "num" }, r.wall_time_s == null ? "" : fmt.secs(r.wall_time_s)),
      el("td", { class: "num" }, r.peak_memory_mb == null ? "" : `${r.peak_memory_mb.toFixed(0)} MiB`));
  });
  $("runs-table").replaceChildren(head, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 10, class: "muted" }, "no runs yet"))]));
  $("compare").disabled = document.querySelectorAll(".pick:checked").length < 2;
  $("experiments").replaceChildren(...data.experiments.map(showExperiment));
  if ($("runs").classList.contains("active")) runsTimer = setTimeout(loadRuns, 5000);
}

async function showRun(name) {
  const run = await api("api/run?run=" + encodeURIComponent(name));
  const box = $("run-detail");
  box.hidden = false;
  box.replaceChildren(el("h2", {}, run.name, " ", el("span", { class: "badge " + run.status }, run.status)));
  if (run.command) box.append(el("pre", { class: "command" }, run.command));
  if (run.error) box.append(el("p", { class: "error" }, run.error));
  if (run.has_curve) box.append(el("img", { src: fileUrl(run.name + "/loss_curve.png"), alt: "loss curve of " + run.name }));
  else if (run.loss.length) { const c = el("canvas", { width: 600, height: 260 }); box.append(c); lineChart(c, [{ label: "train loss", points: run.loss }]); }
  if (run.checkpoints.length) box.append(el("p", {}, "checkpoints: " + run.checkpoints.map((c) => run.interrupted.includes(c) ? c + " (save interrupted)" : c).join(", ")));
  if (run.summary) box.append(el("details", {}, el("summary", {}, "run_summary.json"), el("pre", {}, JSON.stringify(run.summary, null, 2))));
}

async function compareRuns() {
  const names = [...document.querySelectorAll(".pick:checked")].map((c) => c.value);
  const runs = await Promise.all(names.map((n) => api("api/run?run=" + encodeURIComponent(n))));
  const canvas = $("compare-chart");
  canvas.hidden = false;
  lineChart(canvas, runs.map((r) => ({ label: r.name, points: r.loss })));
}

function markdownTable(text) {
  const lines = text.split("\n").filter((l) => l.startsWith("|"));
  const table = el("table", { class: "list" });
  lines.forEach((line, i) => {
    if (i === 1) return; // the |---| separator
    const cells = line.split("|").slice(1, -1).map((c) => c.trim());
    table.append(el("tr", {}, ...cells.map((c) => el(i ? "td" : "th", {}, c))));
  });
  return table;
}

function showExperiment(x) {
  const card = el("div", { class: "card experiment" }, el("h2", {}, "experiment: " + x.name));
  if (x.command) card.append(el("pre", { class: "command" }, x.command));
  if (x.table) card.append(markdownTable(x.table));
  for (const p of x.plots) card.append(el("img", { src: fileUrl(p), alt: p }));
  return card;
}

// ---- Try ----
const chats = { adapter: [], base: [] };

async function loadAdapters() {
  const data = await api("api/runs").catch(() => ({ runs: [] }));
  $("adapters").replaceChildren(...data.runs.flatMap((r) => r.adapters).map((a) => el("option", { value: a })));
}

function addBubble(which, role, text) {
  const box = $("chat-" + which);
  const node = el("div", { class: "bubble " + role }, text);
  box.append(node);
  box.scrollTop = box.scrollHeight;
  return node;
}

async function reply(which, adapter, model) {
  const pending = addBubble(which, "assistant pending", "…");
  try {
    const out = await api("api/chat", { messages: chats[which], adapter, model, max_new_tokens: Number($("max-new-tokens").value) });
    chats[which].push({ role: "assistant", content: out.reply });
    pending.textContent = out.reply || "(empty reply)";
    pending.className = "bubble assistant";
    pending.title = `${out.seconds.toFixed(1)} s`;
  } catch (err) {
    chats[which].pop();
    pending.remove();
    $("chat-error").textContent = err.message;
  }
}

async function send() {
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-error").textContent = "";
  $("chat-input").value = "";
  $("send").disabled = true;
  const adapter = $("adapter").value.trim();
  let base = $("base-model").value.trim();
  try {
    if (adapter && !base) base = (await api("api/base?adapter=" + encodeURIComponent(adapter))).base || "";
  } catch (err) {
    $("chat-error").textContent = err.message;
    $("send").disabled = false;
    return;
  }
  for (const which of ["adapter", "base"]) { chats[which].push({ role: "user", content: text }); addBubble(which, "user", text); }
  // one after the other: the server computes one answer at a time anyway
  await reply("adapter", adapter, base);
  await reply("base", "", base);
  $("send").disabled = false;
}

function resetChat() {
  chats.adapter = []; chats.base = [];
  $("chat-adapter").replaceChildren(); $("chat-base").replaceChildren();
}

async function runEval() {
  $("eval-error").textContent = ""; $("eval-score").textContent = "evaluating…";
  $("eval-rows").replaceChildren();
  try {
    const out = await api("api/eval", { data: $("eval-data").value.trim(), adapter: $("adapter").value.trim(), model: $("base-model").value.trim(), limit: Number($("eval-limit").value) || null, max_new_tokens: Number($("max-new-tokens").value) });
    $("eval-score").textContent = `exact match ${out.exact_match.toFixed(4)} (${out.rows.filter((r) => r.match).length}/${out.n})  loss ${out.loss.toFixed(4)}`;
    $("eval-rows").replaceChildren(el("tr", {}, ...["", "prompt", "expected", "got"].map((h) => el("th", {}, h))),
      ...out.rows.map((r) => el("tr", { class: r.match ? "match" : "miss" }, el("td", {}, r.match ? "✓" : "✗"), el("td", {}, r.prompt), el("td", {}, r.expected), el("td", {}, r.got))));
  } catch (err) {
    $("eval-score").textContent = "";
    $("eval-error").textContent = err.message;
  }
}

// ---- start ----
async function init() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  const info = await api("api/info");
  $("runs-dir").textContent = "runs: " + info.runs_dir;
  $("method").replaceChildren(...info.methods.map((m) => el("option", { value: m }, m)));
  $("method").value = "lora";
  toggleMethodFields();
  $("method").addEventListener("change", toggleMethodFields);
  for (const input of document.querySelectorAll("[data-setting]")) input.addEventListener("input", schedulePlan);
  $("to-run").addEventListener("click", () => showTab("run"));
  $("start").addEventListener("click", startRun);
  $("stop").addEventListener("click", stopRun);
  $("refresh-runs").addEventListener("click", loadRuns);
  $("compare").addEventListener("click", compareRuns);
  $("send").addEventListener("click", send);
  $("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter") send(); });
  $("reset").addEventListener("click", resetChat);
  $("eval-run").addEventListener("click", runEval);
  runPlan();
}

init().catch((err) => { document.body.prepend(el("p", { class: "error" }, err.message)); });
