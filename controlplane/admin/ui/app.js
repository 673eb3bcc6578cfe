// Switchyard web console: the public admin API, nothing else.
//
// State comes from GET /v1/models and GET /v1/rollouts; GET /v1/events (SSE, read with
// fetch() because EventSource cannot send the Authorization header) says what changed, and
// the affected model is fetched again. Health charts sample GET /v1/models/{m}/health for
// the open model only, and keep their series in this tab.
'use strict';

const TOKEN_KEY = 'switchyard.adminToken';
const ACTIVE = ['progressing', 'paused'];
// Which command each phase allows (the engine's TRANSITIONS, minus the no-op repeats).
const ALLOWED = {
  pause: ['progressing'],
  resume: ['paused'],
  promote: ['progressing', 'paused'],
  abort: ['progressing', 'paused'],
};
const COLORS = ['#1d4ed8', '#b45309', '#047857', '#7e22ce', '#be123c', '#0f766e'];
const SAMPLE_MS = 3000;
const HEALTH_WINDOW_S = 5;
const KEEP_MS = 5 * 60 * 1000;
const MIN_SPAN_MS = 60 * 1000;
const RECONNECT_MS = [500, 1000, 2000, 5000];
const CHARTS = [
  { key: 'requests_per_second', title: 'Requests/s', unit: '/s', digits: 1 },
  { key: 'error_rate', title: 'Error rate', unit: '%', scale: 100, digits: 1, min: 1 },
  { key: 'latency_p95_ms', title: 'p95 latency', unit: 'ms', digits: 1 },
  { key: 'ttft_p95_ms', title: 'p95 TTFT', unit: 'ms', digits: 1 },
];
const FIGURE_ROWS = [
  { key: 'requests', title: 'requests', limit: 'min_requests', digits: 0 },
  { key: 'error_rate', title: 'error rate', limit: 'max_error_rate', digits: 3 },
  { key: 'latency_p95_ms', title: 'p95 latency ms', limit: 'max_latency_p95_ms', digits: 1 },
  { key: 'ttft_p95_ms', title: 'p95 TTFT ms', limit: 'max_ttft_p95_ms', digits: 1 },
];

const state = {
  models: new Map(), // name -> model (GET /v1/models/{m})
  rollouts: new Map(), // model -> rollouts, newest first
  health: new Map(), // model -> [{t, versions: {v: figures}}]
  cards: new Map(), // model -> {root, parts...}
  selected: null,
  seq: new Map(), // model -> sequence of the newest fetch applied, so stale answers are dropped
  nextSeq: 1,
};

// -- small helpers -------------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') element.className = value;
    else if (key === 'text') element.textContent = value;
    else if (key.startsWith('on')) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      element.append(child instanceof Node ? child : String(child));
    }
  }
  return element;
}

function svg(tag, attrs = {}) {
  const element = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, value);
  return element;
}

function colorOf(model, version) {
  const index = model ? model.versions.findIndex((v) => v.name === version) : -1;
  return COLORS[(index < 0 ? 0 : index) % COLORS.length];
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  if (typeof value !== 'number') return String(value);
  return value.toFixed(digits).replace(/\.0+$/, '').replace(/(\.\d*?)0+$/, '$1');
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function slug(text) {
  return String(text).replace(/[^a-zA-Z0-9_-]/g, '-');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- the admin API -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message, field) {
    super(message);
    Object.assign(this, { status, type, field });
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

function authHeaders() {
  return token() ? { Authorization: `Bearer ${token()}` } : {};
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json', ...authHeaders() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method, headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, 'network', `cannot reach the admin API (${error.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status, error.type || 'http_error',
      error.message || `${response.status} ${response.statusText}`, error.field,
    );
  }
  return data;
}

function refusal(error) {
  if (!(error instanceof ApiError) || error.status === 0) return String(error.message || error);
  return `Refused (${error.status} ${error.type}): ${error.message}`;
}

// -- notices -------------------------------------------------------------------------------

let noticeTimer = null;

function notify(kind, text) {
  const notice = $('#notice');
  notice.dataset.kind = kind;
  notice.textContent = text;
  clearTimeout(noticeTimer);
  if (kind === 'ok') noticeTimer = setTimeout(() => notify('none', ''), 8000);
}

function showAuthProblem(error) {
  notify('error', refusal(error));
  if (error.status === 401) $('#token').setAttribute('aria-invalid', 'true');
}

// -- loading state -------------------------------------------------------------------------

async function refreshAll() {
  const seq = state.nextSeq++;
  try {
    const [models, rollouts] = await Promise.all([
      api('GET', '/v1/models'), api('GET', '/v1/rollouts'),
    ]);
    $('#token').removeAttribute('aria-invalid');
    const byModel = new Map();
    for (const rollout of rollouts.rollouts) {
      if (!byModel.has(rollout.model)) byModel.set(rollout.model, []);
      byModel.get(rollout.model).push(rollout);
    }
    const names = new Set(models.models.map((m) => m.name));
    for (const name of [...state.models.keys()]) {
      if (!names.has(name)) dropModel(name);
    }
    for (const model of models.models) {
      applyModel(model, byModel.get(model.name) || [], seq);
    }
    renderModelOrder(models.models.map((m) => m.name));
    $('#models').setAttribute('aria-busy', 'false');
    $('#models-empty').hidden = models.models.length > 0;
    $('#models-empty').textContent = 'No models configured.';
    renderDetailSelect();
  } catch (error) {
    showAuthProblem(error);
    $('#models-empty').textContent = 'Could not load the models: ' + error.message;
  }
}

const pending = new Map(); // model -> {running, again}

function refreshModel(name) {
  // Coalesce bursts of events (a step is several): one fetch in flight per model, one queued.
  const entry = pending.get(name) || { running: false, again: false };
  pending.set(name, entry);
  if (entry.running) {
    entry.again = true;
    return;
  }
  entry.running = true;
  (async () => {
    do {
      entry.again = false;
      const seq = state.nextSeq++;
      try {
        const [model, rollouts] = await Promise.all([
          api('GET', `/v1/models/${encodeURIComponent(name)}`),
          api('GET', `/v1/rollouts?model=${encodeURIComponent(name)}`),
        ]);
        if (!state.models.has(name)) {
          await refreshAll(); // a model we did not know: take the whole picture
        } else {
          applyModel(model, rollouts.rollouts, seq);
        }
      } catch (error) {
        if (error.status === 404) await refreshAll();
        else showAuthProblem(error);
      }
    } while (entry.again);
    entry.running = false;
  })();
}

function applyModel(model, rollouts, seq) {
  if ((state.seq.get(model.name) || 0) > seq) return; // an older answer than what is shown
  state.seq.set(model.name, seq);
  state.models.set(model.name, model);
  state.rollouts.set(model.name, rollouts);
  renderCard(model);
  if (state.selected === model.name) {
    renderHistory();
    renderTargetOptions();
  }
}

function activeRollout(name) {
  const model = state.models.get(name);
  const rollouts = state.rollouts.get(name) || [];
  if (!model || !model.active_rollout) return null;
  return rollouts.find((r) => r.id === model.active_rollout)
    || rollouts.find((r) => ACTIVE.includes(r.phase)) || null;
}

function dropModel(name) {
  const card = state.cards.get(name);
  if (card) card.root.remove();
  for (const map of [state.cards, state.models, state.rollouts, state.health, state.seq]) {
    map.delete(name);
  }
}

// -- the overview: one card per model ------------------------------------------------------

function renderModelOrder(names) {
  const container = $('#models');
  for (const name of names) {
    const card = state.cards.get(name);
    if (card) container.append(card.root); // moves it into order; no rebuild
  }
}

function buildCard(name) {
  const id = slug(name);
  const parts = {};
  parts.title = h('h3', { id: `card-${id}-title`, text: name });
  parts.stable = h('span', { class: 'muted' });
  parts.phase = h('span', { class: 'badge', 'data-phase': 'none' });
  parts.bar = h('div', { class: 'bar', role: 'img' });
  parts.segments = new Map();
  parts.legend = h('p', { class: 'legend' });
  parts.versions = h('tbody');
  const table = h('table', { class: 'versions' },
    h('caption', { class: 'sr-only', text: `Versions of ${name}` }),
    h('thead', {}, h('tr', {}, ['Version', 'Weight', 'State', 'Ready', 'Endpoints']
      .map((text) => h('th', { scope: 'col', text })))),
    parts.versions);

  parts.rolloutTitle = h('p', { class: 'rollout-title' });
  parts.progress = h('progress', { max: 1, value: 0, 'aria-label': `Rollout progress of ${name}` });
  parts.stepText = h('span', { class: 'step-text' });
  parts.message = h('p', { class: 'message' });
  parts.verdict = h('p', { class: 'verdict' });
  parts.figures = h('tbody');
  const figures = h('table', { class: 'figures' },
    h('caption', { class: 'sr-only', text: 'Figures of the last analysis verdict' }),
    h('thead', {}, h('tr', {}, ['Figure', 'Candidate', 'Stable', 'Threshold']
      .map((text) => h('th', { scope: 'col', text })))),
    parts.figures);
  parts.buttons = {};
  const actions = h('div', { class: 'actions', role: 'group', 'aria-label': 'Rollout commands' });
  for (const action of ['pause', 'resume', 'promote', 'abort']) {
    const button = h('button', {
      type: 'button', class: action === 'abort' ? 'warn' : '', 'data-action': action,
      onclick: () => command(name, action, button),
    }, action[0].toUpperCase() + action.slice(1));
    parts.buttons[action] = button;
    actions.append(button);
  }
  parts.actions = actions;
  const rollout = h('section', { class: 'rollout', 'aria-label': `Active rollout of ${name}` },
    parts.rolloutTitle, h('div', { class: 'progress-row' }, parts.progress, parts.stepText),
    parts.message, parts.verdict, figures, actions);

  const root = h('article', { class: 'card', id: `card-${id}`, 'data-model': name,
    'aria-labelledby': `card-${id}-title` },
  h('header', { class: 'card-head' },
    parts.title, parts.stable, parts.phase,
    h('span', { class: 'spacer' }),
    h('button', { type: 'button', 'data-action': 'details',
      onclick: () => selectModel(name, true) }, 'Charts & history'),
    h('button', { type: 'button', class: 'danger', 'data-action': 'rollback',
      onclick: () => confirmRollback(name) }, 'Emergency rollback')),
  parts.bar, parts.legend, table, rollout);
  const card = { root, ...parts };
  state.cards.set(name, card);
  $('#models').append(root);
  return card;
}

function renderCard(model) {
  const card = state.cards.get(model.name) || buildCard(model.name);
  card.stable.textContent = `stable ${model.stable}`;

  // The weight bar: one segment per version, reused so widths animate instead of jumping.
  const label = model.versions.map((v) => `${v.name} ${v.weight}%`).join(', ');
  card.bar.setAttribute('aria-label', `Weights of ${model.name}: ${label}`);
  card.bar.dataset.weights = model.versions.map((v) => `${v.name}=${v.weight}`).join(' ');
  const seen = new Set();
  for (const version of model.versions) {
    seen.add(version.name);
    let segment = card.segments.get(version.name);
    if (!segment) {
      segment = h('div', { class: 'segment', 'data-version': version.name });
      segment.style.background = colorOf(model, version.name);
      card.segments.set(version.name, segment);
      card.bar.append(segment);
    }
    segment.style.width = `${version.weight}%`;
    segment.dataset.weight = version.weight;
    segment.textContent = version.weight >= 12 ? `${version.name} ${version.weight}%` : '';
  }
  for (const [name, segment] of card.segments) {
    if (!seen.has(name)) {
      segment.remove();
      card.segments.delete(name);
    }
  }
  card.legend.replaceChildren(...model.versions.map((v) => h('span', { class: 'key' },
    swatch(colorOf(model, v.name)), `${v.name} ${v.weight}%`)));

  card.versions.replaceChildren(...model.versions.map((v) => h('tr', { 'data-version': v.name },
    h('th', { scope: 'row' }, swatch(colorOf(model, v.name)), v.name,
      v.name === model.stable ? h('span', { class: 'tag', text: 'stable' }) : null,
      adapterTag(model, v)),
    h('td', { class: 'num', text: `${v.weight}%` }),
    h('td', {}, h('span', { class: 'state', 'data-state': v.state, text: v.state })),
    h('td', { text: readiness(v), class: v.ready ? 'ok' : 'bad' }),
    h('td', { class: 'endpoints' }, ...v.endpoints.flatMap((url, i) => [i ? ' ' : '',
      h('code', { text: url })])))));

  renderRollout(card, model, activeRollout(model.name));
}

// A LoRA adapter version runs on its base model's servers (docs/lora.md): say which.
function adapterTag(model, v) {
  const adapter = v.backend && v.backend.adapter;
  if (!adapter) return null;
  const lora = adapter.lora_name || `${model.name}--${v.name}`;
  return h('span', { class: 'tag adapter', text: `LoRA on ${adapter.base}`,
    title: `served as ${lora} by ${adapter.base}'s servers, from ${adapter.path}` });
}

// 'ready', or with several replicas how many serve: 'ready 2/3'.
function readiness(v) {
  const text = v.ready ? 'ready' : 'not ready';
  const serving = v.state === 'active' ? v.endpoints.length : 0;
  return (v.replicas || 1) > 1 ? `${text} ${serving}/${v.replicas}` : text;
}

function swatch(color) {
  const element = h('span', { class: 'swatch', 'aria-hidden': 'true' });
  element.style.background = color;
  return element;
}

function renderRollout(card, model, rollout) {
  const last = (state.rollouts.get(model.name) || [])[0];
  card.root.dataset.phase = rollout ? rollout.phase : 'none';
  card.phase.dataset.phase = rollout ? rollout.phase : (last ? last.phase : 'none');
  card.phase.textContent = rollout ? rollout.phase : (last ? `last: ${last.phase}` : 'no rollouts');
  card.actions.classList.toggle('invisible', !rollout);
  for (const [action, button] of Object.entries(card.buttons)) {
    button.disabled = !rollout || !ALLOWED[action].includes(rollout.phase);
  }
  if (!rollout) {
    card.rolloutTitle.textContent = 'No active rollout';
    card.progress.value = 0;
    card.progress.max = 1;
    card.stepText.textContent = '';
    card.message.textContent = last ? `Last: ${last.id} ${last.phase} — ${last.message}` : '';
    card.message.dataset.phase = last ? last.phase : 'none';
    renderVerdict(card, last ? last.analysis_status : null, !!last);
    return;
  }
  card.rolloutTitle.replaceChildren(h('code', { text: rollout.id }), ' ',
    h('strong', { text: rollout.strategy }), ` ${rollout.from} → ${rollout.to}`);
  const total = rollout.steps_total || 1;
  const step = Math.min(rollout.step_index + 1, total);
  card.progress.max = total;
  card.progress.value = Math.min(rollout.step_index, total);
  card.stepText.textContent = `step ${step} of ${total}`;
  card.message.textContent = rollout.message;
  card.message.dataset.phase = rollout.phase;
  renderVerdict(card, rollout.analysis_status, false);
}

function renderVerdict(card, status, isLast) {
  const prefix = isLast ? 'Last verdict' : 'Analysis';
  if (!status) {
    card.verdict.replaceChildren(`${prefix}: none yet`);
    card.verdict.dataset.result = 'none';
  } else {
    card.verdict.replaceChildren(`${prefix}: `,
      h('strong', { class: 'result', 'data-result': status.result, text: status.result }),
      ` at ${clock(status.time)} — ${status.reason}`);
    card.verdict.dataset.result = status.result;
  }
  const figures = (status && status.figures) || {};
  const thresholds = figures.thresholds || {};
  card.figures.parentElement.classList.toggle('invisible', !status);
  card.figures.replaceChildren(...FIGURE_ROWS.map((row) => h('tr', {},
    h('th', { scope: 'row', text: row.title }),
    h('td', { class: 'num', text: fmt(figures.candidate && figures.candidate[row.key], row.digits) }),
    h('td', { class: 'num', text: fmt(figures.stable && figures.stable[row.key], row.digits) }),
    h('td', { class: 'num', text: fmt(thresholds[row.limit], row.digits === 0 ? 0 : 3) }))));
}

// -- commands ------------------------------------------------------------------------------

async function command(name, action, button) {
  const rollout = activeRollout(name);
  if (!rollout) return;
  button.setAttribute('aria-busy', 'true');
  try {
    const result = await api('POST', `/v1/rollouts/${encodeURIComponent(rollout.id)}/${action}`);
    notify('ok', `${action}: ${result.id} is ${result.phase} — ${result.message}`);
  } catch (error) {
    notify('error', refusal(error));
  } finally {
    button.removeAttribute('aria-busy');
    refreshModel(name);
  }
}

let confirmed = null;

function confirmRollback(name) {
  const dialog = $('#confirm');
  const text = name
    ? `Abort any active rollout of ${name} and send all its traffic to its last known-good `
      + 'version now?'
    : 'Abort every active rollout and send each model\'s traffic to its last known-good '
      + 'version now?';
  $('#confirm-title').textContent = name ? `Emergency rollback of ${name}` : 'Emergency rollback of all models';
  $('#confirm-text').textContent = text;
  confirmed = name ? { model: name } : { all: true };
  dialog.returnFocusTo = document.activeElement;
  dialog.showModal();
}

async function rollback(body) {
  try {
    const result = await api('POST', '/v1/rollback', body);
    const summary = result.models.map((m) => `${m.name} → ${m.versions
      .filter((v) => v.weight === 100).map((v) => v.name).join('')}`).join(', ');
    notify('ok', `Rolled back: ${summary}`);
  } catch (error) {
    notify('error', refusal(error));
  }
  if (body.model) refreshModel(body.model);
  else refreshAll();
}

// -- per model: charts, history and the rollout form ---------------------------------------

function renderDetailSelect() {
  const select = $('#detail-model');
  const names = [...state.models.keys()];
  const current = [...select.options].map((o) => o.value).join('\n');
  if (current !== names.join('\n')) {
    select.replaceChildren(...names.map((n) => h('option', { value: n, text: n })));
  }
  if (!state.selected || !state.models.has(state.selected)) {
    selectModel(names[0] || null, false);
  } else {
    select.value = state.selected;
  }
}

function selectModel(name, focus) {
  state.selected = name;
  $('#detail-model').value = name || '';
  for (const [model, card] of state.cards) card.root.classList.toggle('selected', model === name);
  buildCharts();
  renderCharts();
  renderHistory();
  renderTargetOptions();
  $('#rf-error').textContent = '';
  if (name) sampleHealth();
  if (focus) $('#detail-heading').scrollIntoView({ block: 'start', behavior: 'smooth' });
  if (focus) $('#detail-model').focus({ preventScroll: true });
}

function renderTargetOptions() {
  const select = $('#rf-to');
  const model = state.models.get(state.selected);
  const names = model ? model.versions.map((v) => v.name) : [];
  const previous = select.value;
  if ([...select.options].map((o) => o.value).join('\n') !== names.join('\n')) {
    select.replaceChildren(...names.map((n) => h('option', { value: n, text: n })));
  }
  if (names.includes(previous) && previous !== (model && model.stable)) select.value = previous;
  else if (model) select.value = names.find((n) => n !== model.stable) || names[0] || '';
}

function renderHistory() {
  const list = $('#history');
  const rollouts = (state.rollouts.get(state.selected) || []).slice(0, 20);
  if (!rollouts.length) {
    list.replaceChildren(h('li', { class: 'empty muted', text: 'No rollouts yet.' }));
    return;
  }
  list.replaceChildren(...rollouts.map((r) => {
    const end = r.history.length ? r.history[r.history.length - 1].time : r.updated_at;
    const steps = r.history.slice(-12).map((entry) => h('li', { 'data-event': entry.event },
      h('time', { text: clock(entry.time) }), ` ${entry.event} `,
      h('span', { class: 'muted', text: Object.entries(entry.weights)
        .map(([v, w]) => `${v}=${w}`).join(' ') })));
    return h('li', { class: 'entry', 'data-phase': r.phase, 'data-id': r.id },
      h('p', { class: 'entry-head' },
        h('span', { class: 'badge', 'data-phase': r.phase, text: r.phase }), ' ',
        h('code', { text: r.id }), ` ${r.strategy} ${r.from} → ${r.to}`,
        h('span', { class: 'muted', text: ` ${clock(r.created_at)}–${clock(end)}` })),
      h('p', { class: 'entry-why', text: r.message }),
      h('ol', { class: 'transitions', 'aria-label': `Transitions of ${r.id}` }, steps));
  }));
}

function buildCharts() {
  const container = $('#charts');
  container.replaceChildren(...CHARTS.map((chart) => h('figure', { class: 'chart',
    'data-chart': chart.key },
  h('figcaption', { text: chart.title }),
  svg('svg', { viewBox: '0 0 240 80', role: 'img', 'aria-label': chart.title,
    preserveAspectRatio: 'none' }),
  h('p', { class: 'latest' }))));
}

async function sampleHealth() {
  const name = state.selected;
  if (!name || document.hidden) return;
  try {
    const health = await api('GET',
      `/v1/models/${encodeURIComponent(name)}/health?window=${HEALTH_WINDOW_S}`);
    const series = state.health.get(name) || [];
    const now = Date.now();
    series.push({ t: now, versions: health.versions });
    while (series.length && series[0].t < now - KEEP_MS) series.shift();
    state.health.set(name, series);
    if (state.selected === name) renderCharts();
  } catch (error) {
    if (error.status === 401) showAuthProblem(error);
  }
}

function renderCharts() {
  const model = state.models.get(state.selected);
  const series = state.health.get(state.selected) || [];
  const now = Date.now();
  const versions = model ? model.versions.map((v) => v.name) : [];
  // The time axis grows with the samples this tab has, from 1 minute up to 5.
  const span = Math.min(KEEP_MS, Math.max(MIN_SPAN_MS, series.length ? now - series[0].t : 0));
  const spanText = `last ${Math.round(span / 60000)} min`;
  for (const chart of CHARTS) {
    const figure = $(`figure[data-chart="${chart.key}"]`);
    if (!figure) continue;
    const plot = $('svg', figure);
    const scale = chart.scale || 1;
    const value = (sample, version) => {
      const figures = sample.versions[version];
      const raw = figures ? figures[chart.key] : null;
      return raw === null || raw === undefined ? null : raw * scale;
    };
    let top = chart.min || 0;
    for (const sample of series) {
      for (const version of versions) top = Math.max(top, value(sample, version) || 0);
    }
    top = niceCeiling(top || 1);
    const x = (t) => 240 * (1 - (now - t) / span);
    const y = (v) => 78 - (v / top) * 72;
    const children = [
      svg('line', { x1: 0, y1: 78, x2: 240, y2: 78, class: 'axis' }),
      svg('line', { x1: 0, y1: 6, x2: 240, y2: 6, class: 'grid' }),
    ];
    for (const version of versions) {
      let d = '';
      let open = false;
      for (const sample of series) {
        const v = value(sample, version);
        if (v === null) {
          open = false;
          continue;
        }
        d += `${open ? 'L' : 'M'}${x(sample.t).toFixed(1)},${y(v).toFixed(1)}`;
        open = true;
      }
      if (d) {
        children.push(svg('path', { d, class: 'line', stroke: colorOf(model, version),
          'data-version': version }));
      }
    }
    plot.replaceChildren(...children);
    const last = series[series.length - 1];
    const latest = versions.map((version) => {
      const v = last ? value(last, version) : null;
      return `${version} ${v === null ? '–' : fmt(v, chart.digits) + ' ' + chart.unit}`;
    });
    plot.setAttribute('aria-label', `${chart.title}, ${spanText}; now ${latest.join(', ')}`);
    figure.querySelector('.latest').replaceChildren(
      h('span', { class: 'muted', text: `${spanText}, max ${fmt(top, 2)} ${chart.unit} · ` }),
      ...versions.flatMap((version, i) => [i ? ' ' : '',
        h('span', { class: 'key' }, swatch(colorOf(model, version)), latest[i])]));
  }
}

function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

// -- the rollout form ----------------------------------------------------------------------

function numberOrText(text) {
  // What the user typed goes to the API as a number when it is one; anything else is sent as
  // typed, so the API's own validation message names the problem.
  const trimmed = text.trim();
  if (trimmed === '') return undefined;
  const number = Number(trimmed);
  return Number.isFinite(number) ? number : trimmed;
}

function rolloutSpec() {
  const form = $('#rollout-form');
  const value = (name) => form.elements[name].value;
  const spec = { model: state.selected, to: value('to'), strategy: value('strategy') };
  if (spec.strategy === 'canary') {
    const pause = numberOrText(value('pause'));
    spec.steps = [];
    for (const item of value('steps').split(',')) {
      if (spec.steps.length) spec.steps.push({ pause: pause === undefined ? {} : { seconds: pause } });
      spec.steps.push({ set_weight: numberOrText(item) ?? item.trim() });
    }
  } else if (spec.strategy === 'gradual') {
    spec.duration_seconds = numberOrText(value('duration_seconds'));
    spec.step_percent = numberOrText(value('step_percent'));
  } else if (spec.strategy === 'ab') {
    spec.weight = numberOrText(value('weight'));
    spec.sticky = { header: value('sticky_header').trim() };
  } else if (spec.strategy === 'mirror') {
    spec.percent = numberOrText(value('percent'));
  }
  if (form.elements.analysis.checked) {
    spec.analysis = {};
    for (const input of form.querySelectorAll('[name^="analysis."]')) {
      const v = numberOrText(input.value);
      if (v !== undefined) spec.analysis[input.name.slice('analysis.'.length)] = v;
    }
  }
  return spec;
}

function fieldInput(field) {
  // The API names the field at fault ("steps[2].set_weight", "analysis.max_error_rate").
  if (!field) return null;
  const form = $('#rollout-form');
  if (field.startsWith('steps')) return form.elements[/pause/.test(field) ? 'pause' : 'steps'];
  if (field === 'sticky' || field.startsWith('sticky.')) return form.elements.sticky_header;
  if (field === 'model') return $('#detail-model');
  return form.elements[field] || null;
}

async function submitRollout(event) {
  event.preventDefault();
  const error = $('#rf-error');
  const form = $('#rollout-form');
  for (const input of form.querySelectorAll('[aria-invalid]')) {
    input.removeAttribute('aria-invalid');
    input.removeAttribute('aria-errormessage');
  }
  error.textContent = '';
  if (!state.selected) return;
  const submit = $('#rf-submit');
  submit.disabled = true;
  try {
    const rollout = await api('POST', '/v1/rollouts', rolloutSpec());
    notify('ok', `Started ${rollout.id}: ${rollout.strategy} ${rollout.from} → ${rollout.to}`);
    refreshModel(rollout.model);
  } catch (failure) {
    error.textContent = refusal(failure);
    const input = fieldInput(failure.field);
    if (input) {
      input.setAttribute('aria-invalid', 'true');
      input.setAttribute('aria-errormessage', 'rf-error');
    }
    if (failure.status === 401) $('#token').setAttribute('aria-invalid', 'true');
  } finally {
    submit.disabled = false;
  }
}

function showStrategyFields() {
  const strategy = $('#rf-strategy').value;
  for (const fieldset of document.querySelectorAll('fieldset[data-strategy]')) {
    fieldset.hidden = fieldset.dataset.strategy !== strategy;
  }
}

function toggleAnalysisFields() {
  const on = $('#rf-analysis').checked;
  for (const input of document.querySelectorAll('#rf-analysis-fields input')) input.disabled = !on;
}

// -- live events ---------------------------------------------------------------------------

let stream = null; // the AbortController of the current event stream

function setLive(kind, text) {
  $('#live').dataset.state = kind;
  $('#live-text').textContent = text;
}

async function listen() {
  let attempt = 0;
  for (;;) {
    const controller = new AbortController();
    stream = controller;
    try {
      const response = await fetch('/v1/events', {
        headers: { Accept: 'text/event-stream', ...authHeaders() },
        cache: 'no-store', signal: controller.signal,
      });
      if (!response.ok) {
        let message = `${response.status} ${response.statusText}`;
        try {
          message = (await response.json()).error.message;
        } catch { /* not our JSON */ }
        setLive('down', response.status === 401 ? 'Not authorized' : 'Events unavailable');
        throw new ApiError(response.status, 'events', message);
      }
      setLive('live', 'Live');
      attempt = 0;
      refreshAll(); // whatever happened while we were not listening
      await readEvents(response.body, controller.signal);
      setLive('down', 'Reconnecting…');
    } catch (error) {
      if (controller.signal.aborted) continue; // a new token: reconnect at once
      if (!(error instanceof ApiError)) setLive('down', 'Reconnecting…');
    }
    const wait = RECONNECT_MS[Math.min(attempt, RECONNECT_MS.length - 1)];
    attempt += 1;
    await Promise.race([sleep(wait), new Promise((resolve) => {
      controller.signal.addEventListener('abort', resolve, { once: true });
    })]);
  }
}

async function readEvents(body, signal) {
  // Server-Sent Events framing: `field: value` lines, a blank line ends an event.
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener('abort', () => reader.cancel().catch(() => {}), { once: true });
  let buffer = '';
  let event = { type: 'message', data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, '');
      buffer = buffer.slice(newline + 1);
      if (line === '') {
        if (event.data.length) dispatch(event.type, event.data.join('\n'));
        event = { type: 'message', data: [] };
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event.type = text;
        else if (field === 'data') event.data.push(text);
      }
    }
  }
}

function dispatch(type, data) {
  let payload = {};
  try {
    payload = JSON.parse(data);
  } catch {
    return;
  }
  if (type === 'xds.nack') {
    notify('error', `Envoy ${payload.node} rejected ${payload.type} ${payload.version}: `
      + payload.message);
  } else if (type === 'rollout.rolled_back') {
    notify('error', `${payload.model}: ${payload.id} rolled back — ${payload.message}`);
  }
  if (payload.model) refreshModel(payload.model);
}

function restartStream() {
  if (stream) stream.abort();
}

// -- wiring --------------------------------------------------------------------------------

function showTokenState() {
  $('#token-state').textContent = token() ? 'token set for this tab' : 'no token set';
}

function start() {
  $('#token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('#token');
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    input.value = '';
    input.removeAttribute('aria-invalid');
    showTokenState();
    notify('none', '');
    refreshAll();
    restartStream();
  });
  $('#token-forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    refreshAll();
    restartStream();
  });
  $('#rollback-all').addEventListener('click', () => confirmRollback(null));
  const dialog = $('#confirm');
  $('#confirm-cancel').addEventListener('click', () => dialog.close('cancel'));
  $('#confirm-ok').addEventListener('click', () => dialog.close('ok'));
  dialog.addEventListener('close', () => {
    if (dialog.returnFocusTo && dialog.returnFocusTo.focus) dialog.returnFocusTo.focus();
    if (dialog.returnValue === 'ok' && confirmed) rollback(confirmed);
    confirmed = null;
    dialog.returnValue = '';
  });
  $('#detail-model').addEventListener('change', (event) => selectModel(event.target.value, false));
  $('#rf-strategy').addEventListener('change', showStrategyFields);
  $('#rf-analysis').addEventListener('change', toggleAnalysisFields);
  $('#rollout-form').addEventListener('submit', submitRollout);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) sampleHealth();
  });
  showTokenState();
  showStrategyFields();
  toggleAnalysisFields();
  buildCharts();
  setInterval(sampleHealth, SAMPLE_MS);
  refreshAll();
  listen();
}

start();
