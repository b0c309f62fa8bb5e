// The node's dashboard: reads the API every few seconds (the newest series only, so a node
// with years of studies answers as fast as a new one) and acts through it.
// Every value goes into the page with textContent: what peers send is never HTML.
"use strict";

const REFRESH_MS = 3000;
const SHOWN_SERIES = 50;
const SHOWN_DISPATCHES = 10;
const PRIORITIES = ["stat", "routine", "low"];
const ATTENTION = new Set(["failed", "dead", "retrying"]);
const RETRYABLE = new Set(["failed", "dead", "cancelled"]);
const $ = (selector) => document.querySelector(selector);

let token = sessionStorage.getItem("ainode-token") || "";
let timer = null;
let rulesLoaded = false;

async function api(method, path, body, type = "application/json") {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = type;
    init.body = type === "application/json" ? JSON.stringify(body) : body;
  }
  const response = await fetch(path, init);
  const answer = response.headers.get("content-type")?.includes("json")
    ? await response.json()
    : await response.text();
  if (!response.ok) {
    const detail = answer.detail ?? answer;
    const error = new Error(typeof detail === "string" ? detail : detail.message);
    error.status = response.status;
    error.detail = detail;
    throw error;
  }
  return answer;
}

function say(text, ok = false) {
  const message = $("#message");
  message.textContent = text;
  message.style.color = ok ? "#1f6f36" : "";
}

function cell(row, value, className) {
  const td = row.insertCell();
  td.textContent = value ?? "";
  if (className) td.className = className;
  return td;
}

function fill(table, items, render) {
  const body = $(`${table} tbody`);
  body.replaceChildren();
  for (const item of items) render(body.insertRow(), item);
  if (!items.length) cell(body.insertRow(), "none").colSpan = 9;
}

function shortUid(uid) {
  return uid && uid.length > 24 ? `…${uid.slice(-20)}` : uid;
}

function studyLabel(study, uid) {
  const name = (study?.patient_name || "").replaceAll("^", " ").trim();
  const who = [name, study?.patient_id && `(${study.patient_id})`].filter(Boolean).join(" ");
  const label = [who, study?.accession_number, study?.study_date].filter(Boolean).join(" · ");
  return label || shortUid(uid);
}

function patientOf(status, seriesUid) {
  // The patient of a series the page shows (the newest ones), for a caller who may see it.
  const series = status.series.find((s) => s.series_instance_uid === seriesUid);
  const study = series && status.studies.find((s) => s.study_instance_uid === series.study_instance_uid);
  return study?.patient_name || study?.patient_id ? studyLabel(study, "") : "";
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function renderSeries(status) {
  const studies = new Map(status.studies.map((s) => [s.study_instance_uid, s]));
  const newest = status.series;
  $("#series-count").textContent =
    newest.length < SHOWN_SERIES
      ? `${status.studies.length} studies, ${newest.length} series`
      : `the newest ${SHOWN_SERIES} series`;
  fill("#series", newest, (row, s) => {
    const study = studies.get(s.study_instance_uid);
    cell(row, studyLabel(study, s.study_instance_uid)).title = s.study_instance_uid;
    cell(row, shortUid(s.series_instance_uid), "uid").title = s.series_instance_uid;
    cell(row, s.series_description || study?.study_description || "", "reason");
    cell(row, s.state, `state-${s.state}`);
    cell(row, s.revision);
    cell(row, s.instances);
    cell(row, s.calling_ae || "-");
    cell(row, s.source);
    cell(row, when(s.last_received_at));
  });
  const select = $("#explain-series");
  const chosen = select.value;
  select.replaceChildren(
    ...newest
      .filter((s) => s.source !== "node")
      .map((s) => new Option(`${shortUid(s.series_instance_uid)} ${s.series_description || ""}`, s.series_instance_uid)),
  );
  if (chosen) select.value = chosen;
}

function renderQueue(status) {
  const jobs = status.jobs;
  const counts = {};
  for (const job of jobs) {
    counts[job.state] ??= [0, 0, 0];
    counts[job.state][job.priority] += 1;
  }
  fill("#queue", Object.entries(counts), (row, [state, byPriority]) => {
    cell(row, state, `state-${state}`);
    for (const count of byPriority) cell(row, count || "");
  });
  fill("#running", jobs.filter((j) => j.state === "running"), (row, job) => {
    cell(row, job.id);
    cell(row, job.pipeline);
    const patient = patientOf(status, job.series_instance_uid);
    cell(row, patient || shortUid(job.series_instance_uid), patient ? "" : "uid").title =
      job.series_instance_uid;
    cell(row, job.stage || "starting");
    cell(row, when(job.started_at));
  });
}

function retryButton(row, noun, id) {
  const button = document.createElement("button");
  button.textContent = "Retry";
  button.dataset.retry = `${noun}-${id}`;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const done = await api("POST", `/api/v1/${noun === "job" ? "jobs" : "dispatches"}/${id}/retry`);
      say(`${noun} ${id} queued again by ${done.by}`, true);
    } catch (error) {
      say(`${noun} ${id} not retried: ${error.message}`);
    }
    refresh();
  });
  row.insertCell().append(button);
}

function renderAttention(status) {
  const items = [
    ...status.jobs
      .filter((j) => ATTENTION.has(j.state))
      .map((j) => {
        const patient = patientOf(status, j.series_instance_uid);
        const what = `job ${j.id} ${j.pipeline}${patient ? ` · ${patient}` : ""}`;
        return { noun: "job", id: j.id, what, ...j };
      }),
    ...status.dispatches
      .filter((d) => ATTENTION.has(d.state))
      .map((d) => ({ noun: "dispatch", id: d.id, what: `dispatch ${d.id} → ${d.destination}`, ...d })),
  ];
  fill("#failed", items, (row, item) => {
    cell(row, item.what);
    cell(row, `${item.state} (${item.attempts} attempts)`, `state-${item.state}`);
    cell(row, (item.error || "").split("\n")[0], "reason");
    if (RETRYABLE.has(item.state)) retryButton(row, item.noun, item.id);
    else cell(row, "");
  });
}

function renderDeliveries(status) {
  fill("#deliveries", status.dispatches.slice(0, SHOWN_DISPATCHES), (row, d) => {
    cell(row, d.id);
    cell(row, d.job_id);
    cell(row, d.destination);
    cell(row, d.state, `state-${d.state}`);
    cell(row, d.commitment || "not asked", d.commitment ? `state-${d.commitment}` : "");
    cell(row, d.attempts);
    cell(row, when(d.finished_at));
  });
}

function renderSystem(status) {
  fill("#pipelines", status.pipelines, (row, p) => {
    cell(row, p.name);
    cell(row, p.version);
    cell(row, p.available ? "ready" : `unavailable: ${p.problem}`, p.available ? "state-complete" : "state-failed reason");
  });
  fill("#processes", status.processes, (row, p) => {
    cell(row, p.name);
    cell(row, p.pid);
    cell(row, p.alive ? "yes" : "NO", p.alive ? "state-complete" : "state-failed");
    cell(row, p.job ?? "");
  });
  fill("#remote-workers", status.remote_workers, (row, w) => {
    cell(row, w.owner);
    cell(row, w.pipelines.join(", "));
    cell(row, w.device);
    cell(row, w.seen_at);
    cell(row, w.job ?? "idle");
  });
  const disk = status.disk;
  $("#disk").textContent = disk
    ? `Storage: ${Math.round(disk.free_mb)} MB free (refuses below ${disk.min_free_mb} MB)` +
      (disk.accepting ? "" : " — REFUSING new studies")
    : "";
  const rules = status.rules.status;
  $("#rules-state").textContent = !rules?.file
    ? "no rules file: series are stored, not processed"
    : rules.error
      ? `${rules.file}: INVALID, the last good rules still route`
      : `${rules.file}: ${rules.rules} rules`;
}

async function refreshReadiness() {
  const badge = $("#ready");
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    badge.textContent = body.status;
    badge.className = `badge ${response.ok ? "ok" : "bad"}`;
    badge.title = Object.entries(body.checks)
      .map(([name, check]) => `${check.ok ? "✓" : "✗"} ${name}: ${check.detail}`)
      .join("\n");
  } catch {
    badge.textContent = "unreachable";
    badge.className = "badge bad";
  }
}

async function readStatus() {
  const newest = `newest=true&limit=${SHOWN_SERIES}`;
  const paths = {
    series: `/api/v1/series?${newest}`,
    studies: `/api/v1/studies?${newest}`,
    jobs: "/api/v1/jobs",
    dispatches: "/api/v1/dispatches",
    pipelines: "/api/v1/pipelines",
    processes: "/api/v1/processes",
    remote_workers: "/api/v1/workers",
    disk: "/api/v1/disk",
    rules: "/api/v1/rules",
  };
  const answers = await Promise.all(Object.values(paths).map((path) => api("GET", path)));
  return Object.fromEntries(Object.keys(paths).map((key, index) => [key, answers[index]]));
}

async function refresh() {
  clearTimeout(timer);
  try {
    const status = await readStatus();
    renderSeries(status);
    renderQueue(status);
    renderAttention(status);
    renderDeliveries(status);
    renderSystem(status);
    if (!rulesLoaded) {
      $("#rules-text").value = status.rules.text ?? "";
      rulesLoaded = true;
    }
    await refreshReadiness();
  } catch (error) {
    if (error.status === 401) return signOut("your token was not accepted");
    say(`cannot read the node's status: ${error.message}`);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function problemsText(problems) {
  return problems.map((p) => `${p.file}:${p.line}:${p.column}: ${p.message}`).join("\n");
}

async function checkRules() {
  const result = $("#rules-result");
  try {
    const checked = await api("POST", "/api/v1/rules/check", $("#rules-text").value, "application/yaml");
    result.textContent = checked.valid
      ? `valid: ${checked.rules} rules`
      : `not valid:\n${problemsText(checked.problems)}`;
  } catch (error) {
    result.textContent = `cannot check: ${error.message}`;
  }
}

async function explainRules() {
  const result = $("#rules-result");
  const series = $("#explain-series").value;
  if (!series) return (result.textContent = "no series to explain yet");
  try {
    const explained = await api("POST", "/api/v1/rules/explain", { series, rules: $("#rules-text").value });
    const lines = [`series ${explained.series_instance_uid}`];
    for (const rule of explained.rules) {
      lines.push(`rule ${rule.rule}: ${rule.matched ? "MATCH" : "no match"}${rule.note ? ` (${rule.note})` : ""}`);
      for (const c of rule.conditions) {
        const actual = c.actual === null && ["all", "any", "not"].includes(c.description) ? "" : `  (actual: ${JSON.stringify(c.actual)})`;
        lines.push(`${"  ".repeat(c.depth + 1)}[${c.matched ? "yes" : "no "}] ${c.description}${actual}`);
      }
    }
    lines.push(explained.jobs.length ? "jobs:" : "jobs: none");
    for (const job of explained.jobs) {
      lines.push(`  ${job.pipeline} -> ${job.destinations.join(", ") || "no destination"} (${job.priority}, at ${job.at})`);
    }
    result.textContent = lines.join("\n");
  } catch (error) {
    result.textContent = error.detail?.problems
      ? `the rules have problems:\n${problemsText(error.detail.problems)}`
      : `cannot explain: ${error.message}`;
  }
}

async function signIn() {
  try {
    const caller = await api("GET", "/api/v1/whoami");
    $("#who").textContent = `${caller.name} (${caller.roles.join(", ")})`;
    $("#find-form").hidden = !caller.roles.includes("phi");
    $("#login").hidden = true;
    $("#logout").hidden = false;
    $("#board").hidden = false;
    say("");
    refresh();
  } catch (error) {
    const tried = token ? "that token was not accepted" : "";
    signOut(error.status === 401 ? tried : `cannot reach the node: ${error.message}`);
  }
}

async function findStudies(event) {
  event.preventDefault();
  const wanted = $("#find").value.trim();
  if (!wanted) return;
  try {
    const found = await api("GET", `/api/v1/studies?find=${encodeURIComponent(wanted)}`);
    $("#find-result").textContent = found.length
      ? found.map((s) => `${studyLabel(s, s.study_instance_uid)} — ${s.study_instance_uid}`).join("; ")
      : `no study of ${wanted}`;
  } catch (error) {
    $("#find-result").textContent = `cannot find: ${error.message}`;
  }
}

function signOut(text = "") {
  clearTimeout(timer);
  token = "";
  rulesLoaded = false;
  sessionStorage.removeItem("ainode-token");
  $("#who").textContent = "";
  $("#login").hidden = false;
  $("#logout").hidden = true;
  $("#board").hidden = true;
  say(text);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("#token").value.trim();
    sessionStorage.setItem("ainode-token", token);
    $("#token").value = "";
    signIn();
  });
  $("#logout").addEventListener("click", () => signOut("signed out"));
  $("#find-form").addEventListener("submit", findStudies);
  $("#rules-check").addEventListener("click", checkRules);
  $("#rules-explain").addEventListener("click", explainRules);
  refreshReadiness();
  signIn();
});
