// Shoal console: the browser side of /_shoal/.
// Vanilla ES2020, no libraries. The page runs under a strict CSP, so there
// is no inline script, no inline handler and no style="" anywhere: the DOM
// is built with createElement/textContent (server data is never parsed as
// HTML) and looks are set with CSS classes.
'use strict';

const API = '/_shoal/api';
const WINDOW_MS = 15 * 60 * 1000; // charts cover the last 15 minutes
const MAX_SAMPLES = 900;          // one sample a second
const GAP_MS = 5000;              // a longer hole between samples breaks a line
const DASH = '\u2013';
const PAGES = ['overview', 'gateway', 'queues', 'realtime', 'api'];

const state = {
  running: false,     // logged in and showing the app
  es: null,           // the live EventSource
  samples: [],        // history, oldest first
  snap: null,         // the last snapshot
  skew: 0,            // server clock minus browser clock, ms
  page: 'overview',
  sessionCheck: null, // the GET /session in flight, if any
  expiryTimer: 0,
  reconnectTimer: 0,
  flashTimer: 0,
  jobsSeq: 0,         // only the newest job search may fill the table
  jobsSearched: false,
  jobsById: new Map(), // string id -> id as the server sent it
  detailId: null,     // job shown in the detail panel
  detailSeq: 0,
  apiLoaded: false,   // the API page fetched its document (or tried to)
  apiSeq: 0,          // only the newest fetch may fill the page
  apiDoc: null,       // the OpenAPI document shown
};

// ---- small DOM helpers --------------------------------------------------

const $ = (id) => document.getElementById(id);

// el('td', {class: 'num', title: 'x'}, 'text', childNode, [more]) -> element.
// Null/false attributes are skipped; strings become text nodes.
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid == null || kid === false) continue;
    e.append(kid instanceof Node ? kid : String(kid));
  }
  return e;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text != null) e.textContent = text;
  return e;
}

// Set text only when it changed (keeps the DOM calm under 1 Hz updates).
function setText(id, text) {
  const e = typeof id === 'string' ? $(id) : id;
  const t = text == null ? DASH : String(text);
  if (e.textContent !== t) e.textContent = t;
}

// Status pill colours: green, red, amber, blue or grey.
const PILL_COLOURS = {
  up: 'green', enabled: 'green', succeeded: 'green',
  down: 'red', failed: 'red', dead: 'red',
  ejected: 'amber', draining: 'amber', starting: 'amber', stopping: 'amber', retrying: 'amber',
  running: 'blue', available: 'blue', drained: 'blue',
};
const pillClass = (s) => 'pill pill-' + (PILL_COLOURS[s] || 'grey');
const pill = (s) => el('span', { class: pillClass(s) }, s == null ? DASH : s);

function setPill(e, s) {
  e.className = pillClass(s);
  setText(e, s);
}

// ---- formatting -----------------------------------------------------------

const pad2 = (n) => String(n).padStart(2, '0');
const serverNow = () => Date.now() + state.skew;

function fmtClock(ms) {
  const d = new Date(ms);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

function fmtDateTime(ms) {
  if (ms == null) return DASH;
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${fmtClock(ms)}`;
}

// Local time; the date only when it is not today.
function fmtWhen(ms) {
  return new Date(ms).toDateString() === new Date().toDateString() ? fmtClock(ms) : fmtDateTime(ms);
}

function fmtDuration(ms) {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

// "in 42 s" or "5 min ago", against the server's clock.
function fmtRel(ms) {
  if (ms == null) return DASH;
  const diff = ms - serverNow();
  return diff >= 0 ? `in ${fmtDuration(diff)}` : `${fmtDuration(diff)} ago`;
}

const fmtStamp = (ms) => (ms == null ? DASH : `${fmtDateTime(ms)} (${fmtRel(ms)})`);

function fmtRate(v) {
  if (v == null) return DASH;
  if (v === 0) return '0';
  if (Math.abs(v) < 10) return v.toFixed(2);
  if (Math.abs(v) < 1000) return v.toFixed(1);
  return Math.round(v).toLocaleString('en-US');
}

function fmtMs(v) {
  if (v == null) return DASH;
  if (v < 1) return `${v.toFixed(2)} ms`;
  if (v < 100) return `${v.toFixed(1)} ms`;
  if (v < 1000) return `${Math.round(v)} ms`;
  return `${(v / 1000).toFixed(2)} s`;
}

const fmtInt = (v) => (v == null ? DASH : Math.round(v).toLocaleString('en-US'));
const fmtPct = (r) => (r == null ? DASH : `${(r * 100).toFixed(1)} %`);

function fmtBytes(n) {
  if (n == null) return DASH;
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

const truncate = (s, n) => (s.length > n ? s.slice(0, n - 1) + '\u2026' : s);
const shortId = (id) => (id.length > 12 ? id.slice(0, 8) + '\u2026' : id);
const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

// ---- keyed table rows -----------------------------------------------------
// Rows are kept per key and only changed cells are rewritten, so rows and
// buttons stay the same elements from one second to the next.

// A cell spec: a plain value (null shows a dash), or
// {text, cls, title, field}, {pill, field, title}, or {sig, build: () => nodes}.
function setCell(td, spec) {
  if (spec === null || typeof spec !== 'object') spec = { text: spec };
  const sig = spec.sig != null
    ? 'b:' + spec.sig
    : JSON.stringify([spec.text, spec.pill, spec.cls, spec.title, spec.field]);
  if (td._sig === sig) return;
  td._sig = sig;
  td.className = spec.cls || '';
  if (spec.field) td.setAttribute('data-field', spec.field);
  if (spec.title) td.title = spec.title; else td.removeAttribute('title');
  if (spec.build) td.replaceChildren(...[].concat(spec.build()));
  else if ('pill' in spec) td.replaceChildren(pill(spec.pill));
  else td.textContent = spec.text == null ? DASH : String(spec.text);
}

function syncRows(tbody, items, keyOf, attrsOf, cellsOf, emptyText) {
  const old = tbody._rows || new Map();
  const rows = new Map();
  for (const item of items) {
    const key = keyOf(item);
    const tr = old.get(key) || el('tr', attrsOf(item));
    const cells = cellsOf(item);
    while (tr.cells.length < cells.length) tr.append(el('td'));
    cells.forEach((c, i) => setCell(tr.cells[i], c));
    rows.set(key, tr);
  }
  tbody._rows = rows;
  // Drop rows that went away (and any placeholder), then fix the order.
  const keep = new Set(rows.values());
  for (const tr of [...tbody.rows]) if (!keep.has(tr) && !(items.length === 0 && tr.classList.contains('empty'))) tr.remove();
  let i = 0;
  for (const tr of rows.values()) {
    if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
    i++;
  }
  if (items.length === 0 && tbody.rows.length === 0) {
    const cols = tbody.parentNode.tHead.rows[0].cells.length;
    tbody.append(el('tr', { class: 'empty' }, el('td', { colspan: cols }, emptyText || 'None.')));
  }
}

function clearRows(tbody) {
  tbody.replaceChildren();
  tbody._rows = new Map();
}

// ---- API ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// One API call. POSTs carry the JSON and console headers; a 401 (except
// on the login itself) sends the user back to the login view.
async function api(method, path, body) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  if (method === 'POST') {
    opts.headers['content-type'] = 'application/json';
    opts.headers['x-shoal-console'] = '1';
    opts.body = JSON.stringify(body ?? {});
  }
  let res;
  try {
    res = await fetch(API + path, opts);
  } catch (e) {
    throw new ApiError(0, `Cannot reach the gateway (${e.message}).`);
  }
  if (res.status === 401 && path !== '/login') {
    sessionExpired();
    throw new ApiError(401, 'Your session has expired. Please log in again.');
  }
  if (!res.ok) throw new ApiError(res.status, await problemDetail(res));
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

// The detail of an RFC 9457 problem, or something readable without one.
async function problemDetail(res) {
  try {
    const p = await res.json();
    return p.detail || p.title || `The request failed (HTTP ${res.status}).`;
  } catch (_) {
    return `The request failed (HTTP ${res.status}).`;
  }
}

// ---- flash messages -------------------------------------------------------

function flash(message, kind = 'ok') {
  const f = $('flash');
  f.textContent = message;
  f.className = 'flash flash-' + kind;
  f.hidden = false;
  clearTimeout(state.flashTimer);
  state.flashTimer = setTimeout(() => { f.hidden = true; }, kind === 'error' ? 15000 : 8000);
}

// ---- login, session and logout --------------------------------------------

async function boot() {
  wireEvents();
  try {
    startApp(await api('GET', '/session'));
  } catch (e) {
    if (e.status !== 401) showLogin(e.message); // 401 already shows the login
  }
}

function showLogin(message) {
  state.running = false;
  closeLive();
  clearTimeout(state.expiryTimer);
  clearTimeout(state.reconnectTimer);
  state.samples = [];
  state.snap = null;
  state.jobsSearched = false;
  $('boot').hidden = true;
  $('app').hidden = true;
  $('login-view').hidden = false;
  setLoginError(message);
  $('login-token').focus();
}

function setLoginError(message) {
  $('login-error').textContent = message || '';
  $('login-error').hidden = !message;
}

// Any 401: the session is over.
function sessionExpired() {
  showLogin(state.running ? 'Your session has expired. Please log in again.' : '');
}

async function onLogin(ev) {
  ev.preventDefault();
  const button = $('login-submit');
  button.disabled = true;
  setLoginError('');
  try {
    await api('POST', '/login', { token: $('login-token').value });
    $('login-token').value = '';
    startApp(null);
  } catch (e) {
    setLoginError(e.message);
  } finally {
    button.disabled = false;
  }
}

async function onLogout() {
  try {
    await api('POST', '/logout', {});
  } catch (_) {
    // Back to the login view either way.
  }
  showLogin('');
}

function startApp(session) {
  state.running = true;
  $('boot').hidden = true;
  $('login-view').hidden = true;
  $('app').hidden = false;
  if (session) scheduleExpiry(session.expires_at);
  else checkSession();
  connectLive();
  route();
}

// Look at the session again when it is due to expire.
function scheduleExpiry(expiresAt) {
  clearTimeout(state.expiryTimer);
  if (!expiresAt) return;
  const delay = Math.min(Math.max(expiresAt - serverNow() + 1000, 1000), 2147483647);
  state.expiryTimer = setTimeout(checkSession, delay);
}

// Resolves to 'ok', 'expired' (the login view is showing) or 'unreachable'.
function checkSession() {
  if (!state.sessionCheck) {
    state.sessionCheck = api('GET', '/session')
      .then((s) => { scheduleExpiry(s && s.expires_at); return 'ok'; })
      .catch((e) => (e.status === 401 ? 'expired' : 'unreachable'))
      .finally(() => { state.sessionCheck = null; });
  }
  return state.sessionCheck;
}

// ---- live data (Server-Sent Events) -----------------------------------------

function setLive(text, cls) {
  const e = $('live-status');
  setText(e, text);
  e.className = 'live-status ' + cls;
}

function connectLive() {
  closeLive();
  setLive('connecting\u2026', 'wait');
  const es = new EventSource(API + '/live');
  state.es = es;
  es.onopen = () => setLive('live', 'ok');
  es.addEventListener('history', (ev) => {
    const data = parseJson(ev.data);
    if (!data) return;
    state.samples = (data.samples || []).slice(-MAX_SAMPLES);
    render();
  });
  es.addEventListener('snapshot', (ev) => {
    const snap = parseJson(ev.data);
    if (snap) onSnapshot(snap);
  });
  es.onerror = () => onLiveError(es);
}

function closeLive() {
  if (state.es) state.es.close();
  state.es = null;
}

function onLiveError(es) {
  if (es !== state.es) return;
  setLive('reconnecting\u2026', 'bad');
  // The browser retries by itself, unless the stream was refused outright
  // (a 401, for one): then ask about the session and reconnect by hand.
  checkSession().then((result) => {
    if (result !== 'expired' && es === state.es && es.readyState === EventSource.CLOSED) {
      clearTimeout(state.reconnectTimer);
      state.reconnectTimer = setTimeout(() => { if (state.running) connectLive(); }, 3000);
    }
  });
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return null;
  }
}

function onSnapshot(snap) {
  state.snap = snap;
  state.skew = snap.at - Date.now();
  if (snap.sample) {
    state.samples.push(snap.sample);
    if (state.samples.length > MAX_SAMPLES) state.samples.splice(0, state.samples.length - MAX_SAMPLES);
  }
  setLive('live', 'ok');
  render();
}

// ---- routing and rendering ------------------------------------------------

function route() {
  const name = location.hash.slice(1);
  const page = PAGES.includes(name) ? name : 'overview';
  state.page = page;
  for (const p of PAGES) $('page-' + p).hidden = p !== page;
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.page === page);
  // Instance rows (tr[data-instance]) live on one page at a time.
  if (page !== 'overview') clearRows($('instances-table').tBodies[0]);
  if (page !== 'gateway') { $('pools').replaceChildren(); $('pools')._sections = new Map(); }
  if (page === 'queues' && state.running && !state.jobsSearched) searchJobs(true);
  if (page === 'api' && state.running && !state.apiLoaded) loadApi();
  render();
}

function render() {
  if (!state.running) return;
  if (state.page === 'overview') drawCharts();
  const snap = state.snap;
  if (!snap) return;
  renderHeader(snap);
  if (state.page === 'overview') renderOverview(snap);
  else if (state.page === 'gateway') renderGateway(snap);
  else if (state.page === 'queues') renderQueues(snap);
  else if (state.page === 'realtime') renderRealtime(snap);
}

function renderHeader(snap) {
  const g = snap.gateway || {};
  setText('gw-listen', g.listen ? `listening on ${g.listen}` : '');
  $('gw-listen').title = g.uptime_secs != null ? `Gateway up for ${fmtDuration(g.uptime_secs * 1000)}` : '';
  $('gw-draining').hidden = !g.draining;
}

// Pools flattened to one list of {pool, inst}.
const allInstances = (snap) =>
  (snap.pools || []).flatMap((p) => (p.instances || []).map((inst) => ({ pool: p.name, inst })));

function instanceTitle(inst) {
  const yes = (b) => (b ? 'yes' : 'no');
  return `healthy: ${yes(inst.healthy)}, registered: ${yes(inst.registered)}, ` +
    `drained by an operator: ${yes(inst.admin_draining)}, ` +
    `ejected by an operator: ${yes(inst.admin_ejected)}, EWMA: ${fmtMs(inst.ewma_ms)}`;
}

// The columns shared by the overview and gateway instance tables.
function instanceCells(inst) {
  return [
    inst.process,
    { text: inst.url, cls: 'mono' },
    { pill: inst.state, field: 'state', title: instanceTitle(inst) },
    { text: fmtRate(inst.rps), cls: 'num' },
    { text: fmtRate(inst.errors_per_sec), cls: inst.errors_per_sec > 0 ? 'num bad' : 'num' },
    { text: fmtMs(inst.p50_ms), cls: 'num' },
    { text: fmtMs(inst.p99_ms), cls: 'num' },
    { text: fmtInt(inst.in_flight), cls: 'num' },
    { text: fmtInt(inst.requests), cls: 'num' },
  ];
}

// ---- page 1: overview -------------------------------------------------------

function renderOverview(snap) {
  const g = snap.gateway || {};
  setText('tile-rps', fmtRate(g.rps));
  setText('tile-errors', fmtRate(g.errors_per_sec));
  $('tile-errors').classList.toggle('bad', g.errors_per_sec > 0);
  setText('tile-p50', fmtMs(g.p50_ms));
  setText('tile-p99', fmtMs(g.p99_ms));
  setText('tile-inflight', fmtInt(g.in_flight));
  setText('tile-connections', fmtInt(g.connections));

  // This gateway, then the others (`gateway.console.peers`), each with
  // its own figures; a dash where a peer did not answer.
  syncRows(
    $('gateways-table').tBodies[0],
    snap.gateways || [],
    (gw) => (gw.this ? 'this' : gw.url),
    (gw) => ({ 'data-gateway': gw.this ? 'this' : gw.url }),
    (gw) => {
      const f = gw.figures || {};
      return [
        gw.this ? `${f.host || 'gateway'} (this one)` : (f.host || gw.url),
        { text: gw.this ? f.listen : gw.url, cls: 'mono' },
        { pill: gw.state, field: 'state', title: gw.error || '' },
        { text: fmtRate(f.rps), cls: 'num', field: 'rps' },
        { text: fmtRate(f.errors_per_sec), cls: f.errors_per_sec > 0 ? 'num bad' : 'num' },
        { text: fmtMs(f.p50_ms), cls: 'num' },
        { text: fmtMs(f.p99_ms), cls: 'num' },
        { text: fmtInt(f.in_flight), cls: 'num' },
        { text: fmtInt(f.connections), cls: 'num' },
        { text: f.instances == null ? DASH : `${f.instances_available} of ${f.instances}`, cls: 'num' },
        { text: f.uptime_secs == null ? DASH : fmtDuration(f.uptime_secs * 1000), cls: 'num' },
      ];
    },
    'No gateways.',
  );

  const procs = snap.processes || [];
  $('processes-note').hidden = procs.length > 0;
  $('processes-table').hidden = procs.length === 0;
  syncRows($('processes-table').tBodies[0], procs, (p) => p.name, (p) => ({ 'data-process': p.name }), (p) => [
    p.name,
    p.role,
    { pill: p.state, field: 'state' },
    { text: p.pid, cls: 'num' },
    { text: p.restarts, cls: p.restarts > 0 ? 'num warn' : 'num' },
    { text: p.address, cls: 'mono' },
    { text: p.last_exit, cls: 'muted' },
  ]);

  // Each worker's own figures (its `/_shoal/worker`): its state (the
  // process's under `shoal up`, else whether it answered), jobs/s and
  // failures/s since the last answer, handlers in flight, run times of
  // its last minute. A dash: the worker did not answer (down, or no
  // admin token to ask it with).
  syncRows(
    $('workers-table').tBodies[0],
    snap.workers || [],
    (w) => w.url,
    (w) => ({ 'data-worker': w.name }),
    (w) => {
      const j = w.jobs || {};
      return [
        w.name,
        { text: j.worker_id, cls: 'mono' },
        { pill: w.state, field: 'state' },
        { text: fmtRate(j.succeeded_per_sec), cls: 'num', field: 'rate' },
        { text: fmtRate(j.failed_per_sec), cls: j.failed_per_sec > 0 ? 'num warn' : 'num' },
        { text: fmtInt(j.running), cls: 'num', field: 'running' },
        { text: fmtMs(j.run_p50_ms), cls: 'num' },
        { text: fmtMs(j.run_p99_ms), cls: 'num' },
        { text: fmtInt(j.succeeded), cls: 'num', field: 'succeeded' },
        { text: fmtInt(j.failed), cls: 'num', field: 'failed' },
      ];
    },
    'No workers.',
  );

  syncRows(
    $('instances-table').tBodies[0],
    allInstances(snap),
    (x) => x.pool + '\n' + x.inst.url,
    (x) => ({ 'data-instance': x.inst.url, 'data-pool': x.pool }),
    (x) => [x.pool, ...instanceCells(x.inst)],
    'No instances.',
  );

  renderEvents(snap.events || []);
}

function renderEvents(events) {
  const ul = $('events');
  const sig = JSON.stringify(events);
  if (ul._sig === sig) return;
  ul._sig = sig;
  // Each item reads "HH:MM:SS text".
  ul.replaceChildren(...events.map((e) =>
    el('li', { class: 'level-' + e.level }, el('time', {}, fmtClock(e.at)), ' ' + e.text)));
  $('events-empty').hidden = events.length > 0;
}

// ---- charts -----------------------------------------------------------------

const CHARTS = [
  { id: 'chart-rps', series: [{ key: 'rps', label: 'req/s' }], fmt: fmtRate },
  { id: 'chart-latency', unit: 'ms', fmt: fmtMs,
    series: [{ key: 'p50_ms', label: 'p50' }, { key: 'p99_ms', label: 'p99' }] },
  { id: 'chart-errors', series: [{ key: 'errors_per_sec', label: 'errors/s' }], fmt: fmtRate },
  { id: 'chart-queue', series: [{ key: 'queue_depth', label: 'jobs waiting' }], fmt: fmtInt,
    empty: 'No queue data' },
  { id: 'chart-instance-rps', byInstance: 'rps', fmt: fmtRate, empty: 'No instances' },
  { id: 'chart-instance-p99', byInstance: 'p99_ms', unit: 'ms', fmt: fmtMs, empty: 'No instances' },
];
const MAX_INSTANCE_LINES = 8;

// The series of a chart by instance: one per instance seen in the
// samples (its latest label), each reading its field of that instance.
function instanceSeries(def, samples) {
  const labels = new Map();
  for (const s of samples) for (const i of s.instances || []) labels.set(i.id, i.label);
  return [...labels].slice(0, MAX_INSTANCE_LINES).map(([id, label]) => ({
    label,
    get: (s) => { const i = (s.instances || []).find((x) => x.id === id); return i ? i[def.byInstance] : null; },
  }));
}
const seriesValue = (ser, s) => (ser.get ? ser.get(s) : s[ser.key]);
const CW = 600, CH = 150;
const PAD = { l: 52, r: 10, t: 10, b: 20 };

function drawCharts() {
  for (const def of CHARTS) drawChart(def, state.samples);
}

// A round number at or above v, for the top of the y axis.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const mag = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= v) return m * mag;
  return 10 * mag;
}

function drawChart(def, samples) {
  const pw = CW - PAD.l - PAD.r, ph = CH - PAD.t - PAD.b;
  const end = samples.length ? samples[samples.length - 1].at : serverNow();
  const start = end - WINDOW_MS;
  const shown = samples.filter((s) => s.at >= start);
  const series = def.byInstance ? instanceSeries(def, shown) : def.series;

  let max = 0, any = false;
  for (const s of shown) {
    for (const ser of series) {
      const v = seriesValue(ser, s);
      if (v != null && Number.isFinite(v)) { any = true; if (v > max) max = v; }
    }
  }
  const top = niceMax(max);
  const x = (at) => PAD.l + ((at - start) / WINDOW_MS) * pw;
  const y = (v) => PAD.t + ph * (1 - v / top);
  const kids = [];

  // Grid: horizontal lines at 0, half and top; vertical every 5 minutes.
  for (const f of [0, 0.5, 1]) {
    const gy = y(top * f);
    kids.push(svgEl('line', { x1: PAD.l, x2: CW - PAD.r, y1: gy, y2: gy, class: f === 0 ? 'axis' : 'grid' }));
  }
  for (const m of [5, 10]) {
    const gx = x(start + m * 60000);
    kids.push(svgEl('line', { x1: gx, x2: gx, y1: PAD.t, y2: PAD.t + ph, class: 'grid' }));
    kids.push(svgEl('text', { x: gx, y: CH - 5, 'text-anchor': 'middle' }, `${15 - m} min ago`));
  }
  const axisLabel = (v) => String(+v.toPrecision(3)) + (def.unit ? ' ' + def.unit : '');
  kids.push(svgEl('text', { x: PAD.l - 6, y: PAD.t + 4, 'text-anchor': 'end' }, axisLabel(top)));
  kids.push(svgEl('text', { x: PAD.l - 6, y: PAD.t + ph + 4, 'text-anchor': 'end' }, '0'));
  kids.push(svgEl('text', { x: PAD.l, y: CH - 5, 'text-anchor': 'start' }, '15 min ago'));
  kids.push(svgEl('text', { x: CW - PAD.r, y: CH - 5, 'text-anchor': 'end' }, 'now'));

  // One path per series; nulls and holes in time break the line.
  series.forEach((ser, i) => {
    let d = '', prevAt = null;
    for (const s of shown) {
      const v = seriesValue(ser, s);
      if (v == null || !Number.isFinite(v)) { prevAt = null; continue; }
      const jump = prevAt === null || s.at - prevAt > GAP_MS;
      d += `${jump ? 'M' : 'L'}${x(s.at).toFixed(1)} ${y(v).toFixed(1)}`;
      prevAt = s.at;
    }
    if (d) kids.push(svgEl('path', { d, class: `line line-${i}` }));
  });

  if (!any) {
    const msg = samples.length ? (def.empty || 'No data yet') : 'Waiting for data';
    kids.push(svgEl('text', { x: PAD.l + pw / 2, y: PAD.t + ph / 2, 'text-anchor': 'middle', class: 'nodata' }, msg));
  }
  $(def.id).replaceChildren(...kids);

  // Legend: each series with its latest value.
  const last = shown[shown.length - 1] || {};
  $(def.id + '-legend').replaceChildren(...series.map((ser, i) =>
    el('span', { class: 'key' }, el('i', { class: `swatch line-${i}` }), `${ser.label} ${def.fmt(seriesValue(ser, last))}`)));
}

// ---- page 2: gateway --------------------------------------------------------

const POOL_COLUMNS = ['Process', 'URL', 'State', 'Req/s', 'Errors/s', 'p50', 'p99', 'In flight', 'Requests', 'Actions'];

function poolSection(name) {
  const tbody = el('tbody');
  const meta = el('span', { class: 'muted' });
  const head = el('tr', {}, POOL_COLUMNS.map((c, i) => el('th', { class: i >= 3 && i <= 8 ? 'num' : null }, c)));
  const section = el('section', { class: 'pool card', 'data-pool': name },
    el('h3', {}, name, ' ', meta),
    el('table', { class: 'grid' }, el('thead', {}, head), tbody));
  section._tbody = tbody;
  section._meta = meta;
  return section;
}

// Drain (those in flight finish) or eject (its streams cut too) unless an
// operator took it out already; re-admit when one did.
function actionButtons(inst) {
  const byOperator = inst.admin_ejected || inst.admin_draining;
  return {
    sig: `${inst.state}|${inst.admin_ejected}|${inst.admin_draining}`,
    build: () => [
      !byOperator &&
        el('button', { type: 'button', class: 'btn small', 'data-action': 'drain' }, 'Drain'),
      !inst.admin_ejected &&
        el('button', { type: 'button', class: 'btn small danger', 'data-action': 'eject' }, 'Eject'),
      byOperator &&
        el('button', { type: 'button', class: 'btn small', 'data-action': 'readmit' }, 'Re-admit'),
    ].filter(Boolean),
  };
}

function renderGateway(snap) {
  const container = $('pools');
  const old = container._sections || new Map();
  const sections = new Map();
  const pools = snap.pools || [];
  for (const pool of pools) {
    const section = old.get(pool.name) || poolSection(pool.name);
    const count = (pool.instances || []).length;
    setText(section._meta, `${pool.balancer}, ${pool.available} of ${count} available`);
    syncRows(
      section._tbody,
      pool.instances || [],
      (inst) => inst.url,
      (inst) => ({ 'data-instance': inst.url, 'data-pool': pool.name }),
      (inst) => [...instanceCells(inst), actionButtons(inst)],
      'No instances.',
    );
    sections.set(pool.name, section);
  }
  container._sections = sections;
  // Drop pools that went away; move a section only when out of place.
  const keep = new Set(sections.values());
  for (const child of [...container.children]) if (!keep.has(child)) child.remove();
  let i = 0;
  for (const section of sections.values()) {
    if (container.children[i] !== section) container.insertBefore(section, container.children[i] || null);
    i++;
  }
  $('pools-empty').hidden = pools.length > 0;
  renderCache(snap.cache || { enabled: false });
}

function renderCache(c) {
  setPill($('cache-status'), c.enabled ? 'enabled' : 'disabled');
  const on = (v) => (c.enabled ? v : DASH);
  setText('cache-entries', on(fmtInt(c.entries)));
  setText('cache-urls', on(fmtInt(c.urls)));
  setText('cache-size', on(`${fmtBytes(c.stored_bytes)} / ${fmtBytes(c.max_bytes)}`));
  setText('cache-ratio', on(fmtPct(c.hit_ratio)));
  setText('cache-hits', on(fmtInt(c.hits)));
  setText('cache-misses', on(fmtInt(c.misses)));
}

async function onPoolsClick(ev) {
  const button = ev.target.closest('button[data-action]');
  const tr = button && button.closest('tr[data-instance]');
  if (!tr) return;
  const url = tr.dataset.instance, pool = tr.dataset.pool, action = button.dataset.action;
  if (action === 'drain' && !confirm(`Drain ${url}? The gateway stops sending it new requests; those in flight, streams included, finish.`)) return;
  if (action === 'eject' && !confirm(`Eject ${url}? The gateway stops sending it new requests and cuts its open streams and WebSockets now (their clients reconnect to another instance).`)) return;
  button.disabled = true;
  try {
    await api('POST', '/instances', { pool, url, action });
    flash({ drain: `Draining ${url}`, eject: `Ejected ${url}` }[action] || `Re-admitted ${url}`);
  } catch (e) {
    flash(e.message, 'error');
  } finally {
    button.disabled = false;
  }
}

async function onPurge(ev) {
  ev.preventDefault();
  const urls = $('purge-urls').value.split('\n').map((s) => s.trim()).filter(Boolean);
  const tags = $('purge-tags').value.split(',').map((s) => s.trim()).filter(Boolean);
  if (!urls.length && !tags.length) {
    flash('Enter at least one URL, path or tag to purge.', 'error');
    return;
  }
  const button = $('purge-submit');
  button.disabled = true;
  try {
    const result = await api('POST', '/purge', { urls, tags });
    flash('purged: ' + JSON.stringify(result));
    $('purge-result').textContent = 'purged\n' + JSON.stringify(result, null, 2);
    $('purge-result').hidden = false;
  } catch (e) {
    flash(e.message, 'error');
  } finally {
    button.disabled = false;
  }
}

// ---- page 3: queues ---------------------------------------------------------

function renderQueues(snap) {
  const q = snap.queues || {};
  const err = $('queues-error');
  err.hidden = q.available !== false;
  setText(err, q.error || 'The job queues are not available.');

  syncRows($('queues-table').tBodies[0], q.queues || [], (r) => r.queue, (r) => ({ 'data-queue': r.queue }), (r) => [
    r.queue,
    { text: fmtInt(r.depth), cls: 'num' },
    { text: fmtInt(r.running), cls: 'num' },
    { text: fmtInt(r.retrying), cls: r.retrying > 0 ? 'num warn' : 'num' },
    { text: fmtInt(r.dead), cls: r.dead > 0 ? 'num bad' : 'num' },
    { text: fmtInt(r.succeeded), cls: 'num' },
    { text: fmtRate(r.completed_per_sec), cls: 'num' },
    { text: fmtRate(r.failed_per_sec), cls: r.failed_per_sec > 0 ? 'num bad' : 'num' },
    { text: `${fmtMs(r.start_latency_p50_ms)} / ${fmtMs(r.start_latency_p99_ms)}`, cls: 'num' },
    { text: r.depth > 0 ? fmtDuration(r.oldest_age_ms) : DASH, cls: 'num' },
  ], 'No queues.');

  syncRows($('cron-table').tBodies[0], q.cron || [], (c) => c.name, (c) => ({ 'data-cron': c.name }), (c) => [
    c.name,
    { text: c.expression, cls: 'mono' },
    c.queue,
    c.kind,
    c.next_run_at == null ? null : `${fmtWhen(c.next_run_at)} (${fmtRel(c.next_run_at)})`,
  ], 'No cron schedules.');
}

// Search jobs with the form's filters; empty filters are left out.
async function searchJobs(quiet = false) {
  state.jobsSearched = true;
  const seq = ++state.jobsSeq;
  const params = new URLSearchParams();
  for (const [name, id] of [['state', 'jobs-state'], ['kind', 'jobs-kind'], ['queue', 'jobs-queue']]) {
    const v = $(id).value.trim();
    if (v) params.set(name, v);
  }
  params.set('limit', '100');
  // Old rows go at once, so nobody reads them as the new answer.
  $('jobs-body').replaceChildren();
  $('jobs-select-all').checked = false;
  setText('jobs-note', 'Searching\u2026');
  try {
    const res = await api('GET', '/jobs?' + params.toString());
    if (seq === state.jobsSeq) renderJobs((res && res.jobs) || []);
  } catch (e) {
    if (seq !== state.jobsSeq) return;
    setText('jobs-note', e.message);
    if (!quiet) flash(e.message, 'error');
  }
}

function renderJobs(jobs) {
  state.jobsById = new Map(jobs.map((j) => [String(j.id), j.id]));
  $('jobs-body').replaceChildren(...jobs.map((job) => {
    const id = String(job.id);
    const dead = job.state === 'dead';
    return el('tr', { 'data-job': id },
      el('td', {}, el('input', { type: 'checkbox', class: 'job-select', value: id, 'aria-label': `Select job ${id}` })),
      el('td', {}, el('button', { type: 'button', class: 'link job-id mono', title: `Show job ${id}` }, shortId(id))),
      el('td', {}, job.queue),
      el('td', {}, job.kind),
      el('td', { 'data-field': 'state' }, pill(job.state)),
      el('td', { class: 'num' }, `${job.attempts}/${job.max_attempts}`),
      el('td', { class: 'error-text', title: job.last_error || null }, job.last_error ? truncate(job.last_error, 80) : DASH),
      el('td', { title: fmtDateTime(job.created_at) }, fmtRel(job.created_at)),
      el('td', { class: 'actions' },
        dead && el('button', { type: 'button', class: 'btn small', 'data-action': 'retry' }, 'Retry'),
        dead && el('button', { type: 'button', class: 'btn small danger', 'data-action': 'discard' }, 'Discard')));
  }));
  const n = jobs.length;
  setText('jobs-note', n === 0 ? 'No jobs match.' : n >= 100 ? 'Showing the first 100 jobs.' : plural(n, 'job') + '.');
}

function selectedJobIds() {
  return [...document.querySelectorAll('#jobs-body .job-select:checked')].map((c) => c.value);
}

// Retry or discard jobs by id, report, then search again.
async function jobAction(action, ids) {
  if (!ids.length) {
    flash('Select one or more jobs first.', 'error');
    return;
  }
  if (action === 'discard' && !confirm(`Discard ${plural(ids.length, 'job')}? This cannot be undone.`)) return;
  let res;
  try {
    res = await api('POST', `/jobs/${action}`, { ids: ids.map((id) => (state.jobsById.has(id) ? state.jobsById.get(id) : id)) });
  } catch (e) {
    flash(e.message, 'error');
    return;
  }
  const done = (res && res.done) || [];
  const refused = (res && res.refused) || [];
  let msg = `${done.length} ${action === 'retry' ? 'retried' : 'discarded'}`;
  if (refused.length) msg += `, ${refused.length} refused: ${[...new Set(refused.map((r) => r.reason))].join('; ')}`;
  flash(msg, refused.length ? 'warn' : 'ok');
  if (state.detailId != null && ids.includes(state.detailId)) showJob(state.detailId);
  searchJobs();
}

function onJobsClick(ev) {
  const tr = ev.target.closest('tr[data-job]');
  if (!tr) return;
  const id = tr.dataset.job;
  if (ev.target.closest('.job-id')) showJob(id);
  const button = ev.target.closest('button[data-action]');
  if (button) jobAction(button.dataset.action, [id]);
}

// ---- job detail panel -------------------------------------------------------

function hideJobDetail() {
  state.detailId = null;
  state.detailSeq++;
  $('job-detail').hidden = true;
  $('jobs-layout').classList.remove('with-detail');
}

function detailFrame(title, ...body) {
  $('job-detail').replaceChildren(
    el('div', { class: 'detail-head' },
      el('h3', {}, title),
      el('button', { type: 'button', class: 'btn small close', 'aria-label': 'Close' }, 'Close')),
    ...body);
  $('job-detail').hidden = false;
  $('jobs-layout').classList.add('with-detail');
}

async function showJob(id) {
  state.detailId = id;
  const seq = ++state.detailSeq;
  detailFrame(`Job ${shortId(id)}`, el('p', { class: 'note' }, 'Loading\u2026'));
  try {
    const job = await api('GET', '/jobs/' + encodeURIComponent(id));
    if (seq === state.detailSeq) renderJobDetail(job);
  } catch (e) {
    if (seq === state.detailSeq) detailFrame(`Job ${shortId(id)}`, el('p', { class: 'error' }, e.message));
  }
}

const asText = (v) => (v == null ? null : typeof v === 'string' ? v : JSON.stringify(v));

function renderJobDetail(job) {
  const fields = [
    ['ID', asText(job.id)],
    ['Queue', job.queue],
    ['Kind', job.kind],
    ['State', pill(job.state)],
    ['Priority', asText(job.priority)],
    ['Attempts', `${job.attempts}/${job.max_attempts}`],
    ['Timeout', job.timeout_ms >= 1000 ? fmtDuration(job.timeout_ms) : fmtMs(job.timeout_ms)],
    ['Unique key', job.unique_key],
    ['Trace ID', job.trace_id],
    ['Progress', asText(job.progress)],
    ['Worker', job.worker_id],
    ['Created', fmtStamp(job.created_at)],
    ['Run at', fmtStamp(job.run_at)],
    ['Started', fmtStamp(job.started_at)],
    ['Finished', fmtStamp(job.finished_at)],
    ['Lease until', fmtStamp(job.lease_until)],
  ];
  const errors = job.errors || [];
  detailFrame(`Job ${shortId(String(job.id))}`,
    el('dl', { class: 'fields' }, fields.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v == null ? DASH : v)])),
    el('h4', {}, 'Payload'),
    el('pre', { class: 'result' }, JSON.stringify(job.payload, null, 2) ?? 'null'),
    el('h4', {}, `Errors (${errors.length})`),
    errors.length
      ? el('ol', { class: 'errors' }, errors.map((e) =>
        el('li', {},
          el('span', { class: 'muted' }, `Attempt ${e.attempt}, ${fmtDateTime(e.at)}`),
          el('pre', { class: 'result error-text' }, e.error))))
      : el('p', { class: 'note' }, 'No errors.'));
}

// ---- page 4: realtime -------------------------------------------------------

function renderRealtime(snap) {
  const items = allInstances(snap);
  syncRows(
    $('realtime-table').tBodies[0],
    items,
    (x) => x.pool + '\n' + x.inst.url,
    (x) => ({ 'data-url': x.inst.url }),
    (x) => [x.pool, x.inst.process, { text: x.inst.url, cls: 'mono' }, { text: fmtInt(x.inst.streams), cls: 'num' }],
    'No instances.',
  );
  const counted = items.filter((x) => x.inst.streams != null);
  setText('realtime-total', counted.length ? fmtInt(counted.reduce((sum, x) => sum + x.inst.streams, 0)) : DASH);
}

// ---- page 5: API reference --------------------------------------------------
// The services' OpenAPI 3.1 document (public, served by the instances behind
// the gateway), fetched on first open or Reload, shown as operations grouped
// by tag. An operation's details are built the first time it is opened.

const OPENAPI_URL = '/api/openapi.json';
const HTTP_METHODS = ['get', 'post', 'put', 'patch', 'delete', 'head', 'options', 'trace'];
const SECURITY_LABELS = { session: 'session', bearer: 'bearer token' };
const SCHEMA_MAX_DEPTH = 12;
// Schema keywords shown as notes beside the type: [keyword, label].
const SCHEMA_NOTES = [
  ['default', 'default'], ['minimum', 'min'], ['exclusiveMinimum', 'min (exclusive)'],
  ['maximum', 'max'], ['exclusiveMaximum', 'max (exclusive)'], ['minLength', 'min length'],
  ['maxLength', 'max length'], ['pattern', 'pattern'], ['minItems', 'min items'], ['maxItems', 'max items'],
];

// Text with `code` spans as nodes (descriptions are never parsed as HTML).
const withCode = (text) => String(text).split('`').map((part, i) => (i % 2 ? el('code', {}, part) : part));
const fmtValues = (values) => values.map((v) => JSON.stringify(v)).join(', ');
const isProblem = (type) => /problem\+json/i.test(type);

async function loadApi() {
  state.apiLoaded = true;
  const seq = ++state.apiSeq;
  $('api-reload').disabled = true;
  $('api-error').hidden = true;
  setText('api-count', 'Loading\u2026');
  try {
    let res;
    try {
      res = await fetch(OPENAPI_URL, { credentials: 'same-origin', cache: 'no-cache', headers: { accept: 'application/json' } });
    } catch (e) {
      throw new Error(`Cannot reach the gateway (${e.message}).`);
    }
    if (!res.ok) throw new Error(await problemDetail(res));
    const doc = parseJson(await res.text());
    if (!doc || !doc.paths || typeof doc.paths !== 'object') throw new Error('The answer is not an OpenAPI document.');
    if (seq === state.apiSeq) renderApi(doc);
  } catch (e) {
    if (seq !== state.apiSeq) return;
    $('api-error').textContent = `Could not load ${OPENAPI_URL}: ${e.message}`;
    $('api-error').hidden = false;
    setText('api-count', '');
  } finally {
    if (seq === state.apiSeq) $('api-reload').disabled = false;
  }
}

function renderApi(doc) {
  state.apiDoc = doc;
  const info = doc.info || {};
  setText('api-title', info.title || 'API');
  setText('api-version', info.version ? `v${info.version}` : '');
  $('api-version').hidden = !info.version;
  $('api-description').replaceChildren(...withCode(info.description || ''));

  // Operations in document order, grouped by their first tag; the
  // document's tag list gives the order of the groups.
  const tags = new Map((doc.tags || []).map((t) => [t.name, t]));
  const groups = new Map([...tags.keys()].map((name) => [name, []]));
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const method of HTTP_METHODS) {
      const op = item && item[method];
      if (!op || typeof op !== 'object') continue;
      const tag = (op.tags && op.tags[0]) || 'other';
      if (!groups.has(tag)) groups.set(tag, []);
      groups.get(tag).push(operationCard(doc, method, path, item, op));
    }
  }
  const sections = [...groups].filter(([, ops]) => ops.length).map(([tag, ops]) => {
    const t = tags.get(tag) || {};
    return el('section', { class: 'api-tag card', 'data-tag': tag },
      el('h3', {}, tag, el('span', { class: 'muted' }, plural(ops.length, 'operation'))),
      t.description && el('p', { class: 'note' }, withCode(t.description)),
      ops);
  });
  $('api-ops').replaceChildren(...sections);
  filterApi();
}

// "session", "bearer token", "session or bearer token"; null when open.
function securityLabel(security) {
  if (!Array.isArray(security)) return null;
  const names = [...new Set(security.flatMap((req) => Object.keys(req || {})))];
  if (!names.length) return null;
  const label = names.map((n) => SECURITY_LABELS[n] || n).join(' or ');
  return security.some((req) => !req || !Object.keys(req).length) ? `${label} (optional)` : label;
}

// A padlock drawn in SVG (no emoji font needed).
function lockIcon() {
  const svg = svgEl('svg', { class: 'lock-icon', viewBox: '0 0 12 14', 'aria-hidden': 'true' });
  svg.append(svgEl('path', { d: 'M3.5 6V4a2.5 2.5 0 0 1 5 0v2' }), svgEl('rect', { x: 1.5, y: 6, width: 9, height: 7, rx: 1.5 }));
  return svg;
}

// One operation: a <details> whose summary is the one-line row.
function operationCard(doc, method, path, item, op) {
  const m = method.toUpperCase();
  const lock = securityLabel(op.security !== undefined ? op.security : doc.security);
  const card = el('details', { class: op.deprecated ? 'api-op deprecated' : 'api-op', 'data-op': `${m} ${path}` },
    el('summary', {},
      el('span', { class: `method method-${method}` }, m),
      el('span', { class: 'api-path mono' }, path),
      el('span', { class: 'api-summary' }, op.summary || op.operationId || ''),
      lock && el('span', { class: 'api-lock', title: `Needs a ${lock}` }, lockIcon(), lock)));
  card._op = { doc, item, op };
  card._search = [m, path, op.summary || '', ...(op.tags || [])].join('\n').toLowerCase();
  return card;
}

// Every word of the filter must appear in the method, path, summary or tags.
function filterApi() {
  if (!state.apiDoc) return;
  const words = $('api-filter').value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  let total = 0, shown = 0;
  for (const section of $('api-ops').children) {
    let any = false;
    for (const card of section.querySelectorAll('.api-op')) {
      const match = words.every((w) => card._search.includes(w));
      card.hidden = !match;
      total++;
      if (match) { shown++; any = true; }
    }
    section.hidden = !any;
  }
  $('api-empty').hidden = shown > 0 || total === 0;
  setText('api-count', shown === total ? plural(total, 'operation') : `${shown} of ${plural(total, 'operation')}`);
}

function buildOperation(card) {
  if (!card || !card._op || card._built) return;
  card._built = true;
  card.append(operationDetails(card._op));
}

// The summary's click comes before the <details> opens; toggle catches the rest.
function onApiClick(ev) {
  const summary = ev.target.closest('summary');
  if (summary) buildOperation(summary.parentNode);
}

function onApiToggle(ev) {
  if (ev.target.open) buildOperation(ev.target);
}

// A local "#/..." JSON pointer within root, or null.
function resolvePointer(root, ref) {
  if (!ref.startsWith('#')) return null;
  let v = root;
  for (const raw of ref.slice(1).split('/').slice(1)) {
    const key = decodeURIComponent(raw).replace(/~1/g, '/').replace(/~0/g, '~');
    if (v == null || typeof v !== 'object' || !(key in v)) return null;
    v = v[key];
  }
  return v;
}

// A parameter, body or response that may be a $ref into the document.
const deref = (doc, obj) => (obj && typeof obj.$ref === 'string' && resolvePointer(doc, obj.$ref)) || obj;

function operationDetails({ doc, item, op }) {
  // Path-level parameters, overridden by the operation's own.
  const params = new Map();
  for (const p of [...(item.parameters || []), ...(op.parameters || [])].map((p) => deref(doc, p))) {
    if (p && p.name) params.set(`${p.in}:${p.name}`, p);
  }
  const body = deref(doc, op.requestBody);
  const responses = Object.entries(op.responses || {});
  return el('div', { class: 'api-body' },
    op.description && el('p', { class: 'api-desc' }, withCode(op.description)),
    op.operationId && el('p', { class: 'muted' }, 'Operation ID ', el('code', {}, op.operationId)),
    params.size > 0 && [el('h4', {}, 'Parameters'), paramTable(doc, [...params.values()])],
    body && [
      el('h4', {}, 'Request body ', body.required && el('span', { class: 'schema-req' }, 'required')),
      body.description && el('p', { class: 'api-desc' }, withCode(body.description)),
      Object.entries(body.content || {}).map(([type, media]) => el('div', { class: 'api-media' },
        el('code', { class: 'api-ctype' }, type),
        media && media.schema !== undefined && schemaTree(doc, media.schema))),
    ],
    responses.length > 0 && [el('h4', {}, 'Responses'), responses.map(([status, r]) => responseBlock(doc, status, deref(doc, r) || {}))]);
}

function paramTable(doc, params) {
  return el('table', { class: 'grid api-params' },
    el('thead', {}, el('tr', {}, ['Name', 'In', 'Required', 'Type', 'Description'].map((h) => el('th', {}, h)))),
    el('tbody', {}, params.map((p) => {
      const t = p.schema !== undefined ? describeRoot(doc, p.schema) : null;
      return el('tr', { 'data-param': p.name },
        el('td', { class: 'mono' }, p.name),
        el('td', {}, p.in),
        el('td', {}, p.required ? 'yes' : 'no'),
        el('td', { class: 'mono' }, t ? typeText(t) + (t.values ? ` (${fmtValues(t.values)})` : '') : DASH),
        el('td', { class: 'wrap' }, p.description ? withCode(p.description) : DASH));
    })));
}

function responseBlock(doc, status, r) {
  const colour = { 2: 'green', 3: 'blue', 4: 'amber', 5: 'red' }[String(status)[0]] || 'grey';
  const content = Object.entries(r.content || {});
  const headers = Object.entries(r.headers || {}).map(([name, h]) => [name, deref(doc, h) || {}]);
  return el('div', { class: 'api-resp', 'data-status': status },
    el('div', { class: 'api-resp-head' },
      el('span', { class: `pill pill-${colour}` }, status),
      el('span', {}, withCode(r.description || '')),
      content.map(([type]) => [
        el('code', { class: 'api-ctype' }, type),
        isProblem(type) && el('span', { class: 'muted' }, 'problem details (RFC 9457)'),
      ])),
    content.map(([type, media]) => !isProblem(type) && media && media.schema !== undefined && schemaTree(doc, media.schema)),
    headers.length > 0 && el('table', { class: 'kv api-headers' },
      el('caption', {}, 'Headers'),
      el('tbody', {}, headers.map(([name, h]) => el('tr', {},
        el('th', { class: 'mono' }, name),
        el('td', {}, h.description ? withCode(h.description) : DASH))))));
}

// ---- JSON Schema as a tree ----

const jsonType = (v) => (v === null ? 'null' : Array.isArray(v) ? 'array'
  : typeof v === 'number' ? (Number.isInteger(v) ? 'integer' : 'number') : typeof v);
const isNullSchema = (s) => s && typeof s === 'object' && (s.type === 'null' || ('const' in s && s.const === null));
const typeText = (info) => info.type + (info.nullable ? ' | null' : '');

// A JSON Schema (2020-12) flattened for display: {type, nullable, desc,
// values (enum/const), notes, fields: [{name, required, info}], variants}.
// Arrays and maps take their items' fields; local $refs are followed once
// per branch, so recursive types stop.
function describeSchema(s, ctx, depth) {
  const info = { type: 'any', nullable: false, desc: null, values: null, notes: [], fields: [], variants: [] };
  if (s === false) info.type = 'nothing';
  if (!s || typeof s !== 'object' || depth > SCHEMA_MAX_DEPTH) return info;

  if (typeof s.$ref === 'string') {
    const { $ref, ...rest } = s;
    const target = ctx.roots.map((root) => resolvePointer(root, $ref)).find((t) => t != null);
    if (target == null || ctx.stack.includes($ref)) {
      info.type = target == null ? $ref : `${$ref.includes('/') ? $ref.split('/').pop() : 'self'} (recursive)`;
      info.desc = rest.description || null;
      return info;
    }
    ctx.stack.push($ref);
    const inner = describeSchema({ ...target, ...rest }, ctx, depth);
    ctx.stack.pop();
    return inner;
  }
  if (s.type === 'null') { info.type = 'null'; return info; }
  info.desc = s.description || s.title || null;

  // anyOf/oneOf: null options make it nullable; one option left stands for the whole.
  const { anyOf, oneOf, allOf, ...rest } = s;
  let alts = anyOf || oneOf || allOf;
  if (Array.isArray(alts) && alts !== allOf) {
    const others = alts.filter((a) => !isNullSchema(a));
    if (others.length < alts.length) info.nullable = true;
    alts = others;
  }
  if (Array.isArray(alts) && alts.length === 1) {
    const inner = describeSchema({ ...alts[0], ...rest }, ctx, depth);
    inner.nullable = inner.nullable || info.nullable;
    return inner;
  }
  if (Array.isArray(alts) && alts.length) {
    if (alts.every((a) => a && typeof a === 'object' && 'const' in a)) info.values = alts.map((a) => a.const);
    else {
      info.type = alts === allOf ? 'all of' : anyOf ? 'any of' : 'one of';
      info.variants = alts.map((a) => describeSchema(a, ctx, depth + 1));
    }
  }

  let types = [].concat(s.type || []);
  if (types.includes('null')) info.nullable = true;
  types = types.filter((t) => t !== 'null');
  if (Array.isArray(s.enum)) {
    if (s.enum.includes(null)) info.nullable = true;
    info.values = s.enum.filter((v) => v !== null);
  }
  if ('const' in s) info.values = [s.const];
  if (!types.length) {
    if (s.properties || (s.additionalProperties && typeof s.additionalProperties === 'object')) types = ['object'];
    else if (s.items || s.prefixItems) types = ['array'];
    else if (info.values) types = [...new Set(info.values.map(jsonType))];
  }
  if (types.length) info.type = types.join(' | ');
  if (s.format) info.type += ` (${s.format})`;
  for (const [key, label] of SCHEMA_NOTES) {
    if (key in s) info.notes.push(`${label} ${key === 'pattern' ? s[key] : JSON.stringify(s[key])}`);
  }
  if (s.uniqueItems) info.notes.push('unique items');
  if (s.readOnly) info.notes.push('read-only');
  if (s.writeOnly) info.notes.push('write-only');
  if (s.deprecated) info.notes.push('deprecated');

  const required = new Set(Array.isArray(s.required) ? s.required : []);
  for (const [name, sub] of Object.entries(s.properties || {})) {
    info.fields.push({ name, required: required.has(name), info: describeSchema(sub, ctx, depth + 1) });
  }
  // An array or a map shows its items' type, and their fields under it.
  const lift = (label, inner) => {
    info.type = `${label} of ${typeText(inner)}`;
    info.fields = inner.fields;
    info.variants = inner.variants;
    info.values = info.values || inner.values;
  };
  const extra = s.additionalProperties;
  if (extra && typeof extra === 'object') {
    const inner = describeSchema(extra, ctx, depth + 1);
    if (info.fields.length) info.fields.push({ name: '(any other key)', required: false, info: inner });
    else lift('map', inner);
  }
  if (s.items && typeof s.items === 'object' && !Array.isArray(s.items)) lift('array', describeSchema(s.items, ctx, depth + 1));
  if (info.values && !info.values.length) info.values = null;
  return info;
}

// Local refs resolve in the schema first ("#/$defs/..."), then the document.
const describeRoot = (doc, schema) => describeSchema(schema, { roots: [schema, doc], stack: ['#'] }, 0);

function schemaTree(doc, schema) {
  const info = describeRoot(doc, schema);
  return el('div', { class: 'schema' }, schemaLine(null, false, info), schemaChildren(info));
}

function schemaLine(name, required, info) {
  return el('div', { class: 'schema-line' },
    name != null && el('span', { class: 'schema-name' }, name),
    el('span', { class: 'schema-type' }, info.type),
    required && el('span', { class: 'schema-req' }, 'required'),
    info.nullable && el('span', { class: 'schema-flag' }, 'nullable'),
    info.values && el('span', { class: 'schema-values' },
      (info.values.length === 1 ? '= ' : 'one of ') + fmtValues(info.values)),
    info.notes.length > 0 && el('span', { class: 'schema-notes' }, info.notes.join(', ')),
    info.desc && el('span', { class: 'schema-desc' }, withCode(info.desc)));
}

function schemaChildren(info) {
  const items = [
    ...info.fields.map((f) => el('li', {}, schemaLine(f.name, f.required, f.info), schemaChildren(f.info))),
    ...info.variants.map((v, i) => el('li', {}, schemaLine(`option ${i + 1}`, false, v), schemaChildren(v))),
  ];
  return items.length ? el('ul', { class: 'schema-tree' }, items) : null;
}

// ---- wiring -----------------------------------------------------------------

function wireEvents() {
  $('login-form').addEventListener('submit', onLogin);
  $('logout').addEventListener('click', onLogout);
  $('flash').addEventListener('click', () => { $('flash').hidden = true; });
  window.addEventListener('hashchange', route);

  $('pools').addEventListener('click', onPoolsClick);
  $('purge-form').addEventListener('submit', onPurge);

  $('jobs-form').addEventListener('submit', (ev) => { ev.preventDefault(); searchJobs(); });
  $('jobs-dead-letters').addEventListener('click', (ev) => {
    ev.preventDefault();
    $('jobs-state').value = 'dead';
    searchJobs();
  });
  $('jobs-body').addEventListener('click', onJobsClick);
  $('jobs-select-all').addEventListener('change', (ev) => {
    for (const c of document.querySelectorAll('#jobs-body .job-select')) c.checked = ev.target.checked;
  });
  $('jobs-retry-selected').addEventListener('click', () => jobAction('retry', selectedJobIds()));
  $('jobs-discard-selected').addEventListener('click', () => jobAction('discard', selectedJobIds()));
  $('job-detail').addEventListener('click', (ev) => { if (ev.target.closest('.close')) hideJobDetail(); });

  $('api-reload').addEventListener('click', () => loadApi());
  $('api-filter').addEventListener('input', filterApi);
  $('api-ops').addEventListener('click', onApiClick);
  $('api-ops').addEventListener('toggle', onApiToggle, true); // toggle does not bubble
}

boot();
