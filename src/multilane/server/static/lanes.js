// The live lanes page: polls GET /v1/lanes once a second and draws lanes, memory and recent runs.
// With an API key on the server, the page asks for it once and keeps it in this tab's sessionStorage;
// `#key=...` in the address does the same (the fragment never reaches the server, and is cleared).
"use strict";

(() => {
  const STORE = "multilane.apiKey";
  const POLL_MS = 1000;
  const RUNS = 12;
  const COLORS = 6; // --lane-0 .. --lane-5
  const MAX_SQUARES = 32; // slots drawn one square each; more make a meter
  const $ = (id) => document.getElementById(id);
  let timer = null;
  const laneColor = new Map();

  // ---- small helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "style") Object.assign(el.style, value);
      else el.setAttribute(name, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i === 0 ? `${n} B` : `${n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
  }

  function seconds(s) {
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    const m = Math.floor(s / 60);
    return `${m}:${String(Math.floor(s % 60)).padStart(2, "0")} min`;
  }

  function countdown(s) {
    const total = Math.max(0, Math.ceil(s));
    const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), sec = total % 60;
    const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(sec).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function clock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  }

  function colorOf(name) {
    if (!laneColor.has(name)) laneColor.set(name, laneColor.size % COLORS);
    return `var(--lane-${laneColor.get(name)})`;
  }

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  // ---- the API key

  function keyFromFragment() {
    const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (match) {
      sessionStorage.setItem(STORE, decodeURIComponent(match[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function askForKey(message) {
    clearTimeout(timer);
    $("main").hidden = true;
    $("key-form").hidden = false;
    $("key-error").hidden = !message;
    $("key-error").textContent = message || "";
    setStatus("locked", "API key needed");
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORE, $("key").value.trim());
    $("key").value = "";
    $("key-form").hidden = true;
    poll();
  });

  // ---- drawing

  function drawBudget(data) {
    const { usage, lanes } = data;
    const budget = usage.budget_bytes;
    const bar = $("budget-bar");
    bar.replaceChildren(...lanes.map((lane) => h("span", {
      title: `${lane.name}: ${bytes(lane.memory_bytes)}`,
      "data-lane": lane.name,
      style: { width: budget ? `${(100 * lane.memory_bytes) / budget}%` : "0", background: colorOf(lane.name) },
    })));
    const share = budget ? ` (${((100 * usage.used_bytes) / budget).toFixed(1)}%)` : "";
    bar.setAttribute("aria-label", `${bytes(usage.used_bytes)} in use of ${budget ? bytes(budget) : "no budget"}`);
    $("budget-text").textContent = `${bytes(usage.used_bytes)} in use${share} of a budget of ` +
      `${budget ? bytes(budget) : "unlimited"} · ${usage.loaded} of ${usage.max_loaded_models} lanes loaded`;
  }

  function keepAlive(lane) {
    if (lane.expires_at === "forever") return "pinned";
    if (lane.expires_in === null || lane.expires_in === undefined) return `in use (then ${lane.keep_alive})`;
    return `unloads in ${countdown(lane.expires_in)}`;
  }

  function drawLane(lane, budget) {
    const label = `${lane.busy} of ${lane.slots} slots busy`;
    const slots = lane.slots <= MAX_SQUARES
      ? h("div", { class: "slots", role: "img", "aria-label": label },
        Array.from({ length: lane.slots }, (_, i) => h("i", { class: i < lane.busy ? "busy" : "" })))
      : h("div", { class: "meter", role: "img", "aria-label": label },
        h("span", { style: { width: `${(100 * lane.busy) / lane.slots}%` } }));
    const memory = `${bytes(lane.memory_bytes)}` + (lane.kv_bytes ? ` (weights ${bytes(lane.weights_bytes)} + KV ` +
      `${bytes(lane.kv_bytes)})` : "") + (budget ? ` · ${((100 * lane.memory_bytes) / budget).toFixed(1)}% of budget` : "");
    const rate = lane.kind === "generate"
      ? [h("span", { class: "big num", "data-field": "tokens_per_second" }, lane.tokens_per_second.toFixed(1)),
        h("span", { class: "muted" }, "tokens/s")]
      : [h("span", { class: "big num", "data-field": "requests_per_second" }, lane.requests_per_second.toFixed(1)),
        h("span", { class: "muted" }, "calls/s")];
    const card = h("article", { class: "card lane", "data-lane": lane.name },
      h("div", { class: "lane-head" },
        h("span", { class: "swatch", style: { background: colorOf(lane.name) } }),
        h("h3", {}, lane.name),
        lane.models.length > 1 ? h("span", { class: "muted small" }, `also ${lane.models.slice(1).join(", ")}`) : null,
        h("span", { class: "tag" }, `${lane.kind} · ${lane.device}`)),
      h("dl", {},
        h("dt", {}, "Slots"), h("dd", {}, slots, h("span", { class: "num", "data-field": "slots" }, `${lane.busy}/${lane.slots}`)),
        h("dt", {}, "Queue"), h("dd", {}, h("span", { class: "num", "data-field": "queued" }, lane.queued),
          h("span", { class: "muted small" }, `waiting (at most ${lane.max_queue})`)),
        h("dt", {}, "Memory"), h("dd", { "data-field": "memory" }, memory),
        h("dt", {}, "Keep-alive"), h("dd", { "data-field": "keep_alive" }, keepAlive(lane)),
        h("dt", {}, "Throughput"), h("dd", {}, rate),
        h("dt", {}, "Requests"), h("dd", {}, h("span", { class: "num", "data-field": "requests" }, lane.requests),
          lane.kind === "generate" ? h("span", { class: "muted small" },
            `${lane.completion_tokens} tokens out, ${lane.prompt_tokens} in`) : null)));
    card.style.setProperty("--lane-color", colorOf(lane.name));
    return card;
  }

  function drawLanes(data) {
    const budget = data.usage.budget_bytes;
    $("lanes").replaceChildren(...(data.lanes.length
      ? data.lanes.map((lane) => drawLane(lane, budget))
      : [h("div", { class: "card empty" }, "No model is loaded. A call to a model loads it.")]));
    $("lanes-text").textContent = `tokens/s over the last ${data.rate_window_seconds} s`;
    const idle = data.models.filter((m) => !m.loaded).map((m) => `${m.name} (${m.kind})`);
    $("unloaded").textContent = idle.length ? `Declared, not loaded: ${idle.join(", ")}` : "";
  }

  function drawRun(run, laneOf) {
    const total = Math.max(run.seconds, ...run.stages.map((s) => s.start + s.seconds), 1e-6);
    const rows = run.stages.flatMap((stage) => [
      h("span", { "data-stage": stage.stage }, stage.stage),
      h("span", { class: "kind" }, stage.model ? `${stage.kind} · ${stage.model}` : stage.kind),
      h("div", { class: "track" }, h("div", {
        class: `span${stage.ok ? "" : " failed"}`,
        title: `${stage.stage}: starts at ${seconds(stage.start)}, takes ${seconds(stage.seconds)}`,
        style: {
          left: `${(100 * stage.start) / total}%`, width: `${(100 * stage.seconds) / total}%`,
          background: stage.ok && stage.model ? colorOf(laneOf.get(stage.model) || stage.model) : null,
        },
      })),
      h("span", { class: "num" }, seconds(stage.seconds) + (stage.tokens ? ` · ${stage.tokens} tok` : "")),
    ]);
    return h("article", { class: "card run", "data-run": run.run_id || "", "data-status": run.status },
      h("div", { class: "run-head" },
        h("span", { class: "pipeline" }, run.pipeline),
        run.run_id ? h("code", { class: "muted" }, run.run_id) : null,
        h("span", { class: `badge ${run.status}` }, run.status),
        h("span", { class: "num" }, seconds(run.seconds)),
        h("span", { class: "muted small" }, `at ${clock(run.started_at)}`)),
      run.error ? h("p", { class: "run-error" }, run.error) : null,
      rows.length ? h("div", { class: "waterfall" }, rows) : null);
  }

  function drawRuns(data) {
    const laneOf = new Map(data.models.map((m) => [m.name, m.lane || m.name]));
    $("runs").replaceChildren(...(data.runs.length
      ? data.runs.map((run) => drawRun(run, laneOf))
      : [h("div", { class: "card empty" }, "No pipeline has run yet. POST /v1/pipelines/NAME/runs runs one.")]));
  }

  function draw(data) {
    $("file").textContent = data.file || "";
    drawBudget(data);
    drawLanes(data);
    drawRuns(data);
    $("main").hidden = false;
  }

  // ---- polling

  async function poll() {
    clearTimeout(timer);
    const key = sessionStorage.getItem(STORE);
    let response;
    try {
      response = await fetch(`/v1/lanes?runs=${RUNS}`, {
        headers: key ? { Authorization: `Bearer ${key}` } : {}, cache: "no-store",
      });
    } catch (error) {
      setStatus("offline", "server unreachable; retrying");
      timer = setTimeout(poll, POLL_MS * 2);
      return;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(STORE);
      askForKey(key ? "The server refused that key." : null);
      return;
    }
    if (!response.ok) {
      setStatus("offline", `the server answered ${response.status}; retrying`);
      timer = setTimeout(poll, POLL_MS * 2);
      return;
    }
    const data = await response.json();
    draw(data);
    setStatus("live", `live · ${clock(data.time)}`);
    timer = setTimeout(poll, POLL_MS);
  }

  keyFromFragment();
  poll();
})();
