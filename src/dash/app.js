// app.js — the agentq dashboard's page: reads the JSON API of
// src/dash/dashboard.c and draws the overview, the task list, one task
// and the dead letters, on hash routes (#/, #/tasks?…, #/task/ID, #/dead?…).
//
// Everything a task, a step or a dead letter says is user text (a goal
// may be "<script>…"): it only ever becomes a text node (el() below makes
// every string child one; textContent elsewhere). No markup is ever parsed
// from data, and the Content-Security-Policy allows no inline script.
//
// The admin token (for cancel and requeue) is pasted once and kept in
// sessionStorage: it lives as long as the tab, and is sent only as an
// Authorization header to this origin.
'use strict';

(function () {
  const TOKEN_KEY = 'agentq.dashboard.token';
  const REFRESH_MS = 5000;
  const STATUSES = ['queued', 'running', 'retrying', 'waiting', 'completed', 'failed', 'timeout',
    'budget_exceeded', 'max_steps', 'cancelled', 'expired', 'rejected'];
  const FINAL = new Set(STATUSES.slice(4));
  const PERIODS = [['', 'any time'], ['1h', 'last hour'], ['24h', 'last 24 hours'], ['7d', 'last 7 days'],
    ['30d', 'last 30 days']];

  let info = { actions: false, management: false, lanes: 0 };
  let timer = null;
  let renderSeq = 0;

  // ------------------------------------------------------------ DOM --

  // el('a', {href: '#/'}, 'text', child, [more]): strings and numbers
  // become text nodes; null, undefined and false are left out.
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, kids);
    return e;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...kids) {
    const e = document.createElementNS(SVG, tag);
    setAttrs(e, attrs);
    append(e, kids);
    return e;
  }

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
      else if (k === 'text') e.textContent = String(v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(e, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      e.appendChild(k instanceof Node ? k : document.createTextNode(String(k)));
    }
  }

  function clear(e) {
    while (e.firstChild) e.removeChild(e.firstChild);
  }

  function show(...nodes) {
    const app = document.getElementById('app');
    clear(app);
    append(app, nodes);
  }

  function notice(text, kind) {
    const n = document.getElementById('notice');
    n.textContent = text || '';
    n.className = 'notice ' + (kind || '');
    n.hidden = !text;
  }

  // ------------------------------------------------------- formatting --

  const nf = new Intl.NumberFormat('en-US');
  const compact = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 1 });
  function num(v) { return v === null || v === undefined ? '—' : nf.format(v); }
  // for the cards: 366.4M rather than a number wider than its card
  function big(v) { return v === null || v === undefined ? '—' : Number(v) < 100000 ? nf.format(v) : compact.format(v); }
  function usd(v) {
    if (v === null || v === undefined) return '—';
    const x = Number(v);
    if (x === 0) return '$0';
    return '$' + (x >= 1 ? x.toFixed(2) : x >= 0.01 ? x.toFixed(4) : x.toPrecision(3));
  }
  function pad(n) { return String(n).padStart(2, '0'); }
  function when(t) {
    if (!t || t === '-infinity') return '—';
    const d = new Date(t);
    if (isNaN(d)) return String(t);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function ago(t) {
    if (!t) return '';
    const s = (Date.now() - new Date(t).getTime()) / 1000;
    if (!isFinite(s)) return '';
    if (s < 0) return 'in ' + span(-s);
    return span(s) + ' ago';
  }
  function span(s) {
    if (s < 1) return Math.round(s * 1000) + ' ms';
    if (s < 90) return (s < 10 ? s.toFixed(1) : Math.round(s)) + ' s';
    if (s < 5400) return Math.round(s / 60) + ' min';
    if (s < 172800) return (s / 3600).toFixed(1) + ' h';
    return Math.round(s / 86400) + ' d';
  }
  function ms(v) { return v === null || v === undefined ? '—' : span(Number(v) / 1000); }
  function pill(status) { return el('span', { class: 'pill st-' + (status || 'none') }, status || '—'); }
  function taskLink(id, text) { return el('a', { href: '#/task/' + encodeURIComponent(id), class: 'mono' }, text || id); }
  function shortId(id) { return String(id).slice(0, 8); }

  // --------------------------------------------------------------- API --

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; }
  }
  function setToken(t) {
    try {
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage refused: the token lives until the reload */ }
    drawAdmin();
  }

  async function api(path, opts) {
    const o = opts || {};
    const headers = { Accept: 'application/json' };
    if (o.admin && token()) headers.Authorization = 'Bearer ' + token();
    let r;
    try {
      r = await fetch(path, { method: o.method || 'GET', headers, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new Error('the dashboard does not answer (' + e.message + ')');
    }
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON: said below */ }
    if (!r.ok) {
      const err = new Error((body && body.error) || ('HTTP ' + r.status));
      err.status = r.status;
      throw err;
    }
    return body;
  }

  async function action(path, what) {
    if (!token()) { notice('Paste the admin token (top right) first.', 'error'); return null; }
    try {
      const r = await api(path, { method: 'POST', admin: true });
      notice(what, 'ok');
      return r;
    } catch (e) {
      if (e.status === 403 && token()) notice('Refused: ' + e.message + '. Paste the token again.', 'error');
      else notice('Failed: ' + e.message, 'error');
      return null;
    }
  }

  // ------------------------------------------------------------- admin --

  function drawAdmin() {
    const box = document.getElementById('admin');
    clear(box);
    if (!info.actions) {
      append(box, [el('span', { class: 'badge ro', title: 'Started without --admin-token-env: no actions' }, 'read-only')]);
      return;
    }
    if (token()) {
      append(box, [el('span', { class: 'badge admin' }, 'admin'),
        el('button', { type: 'button', class: 'link', onclick: () => setToken('') }, 'forget token')]);
      return;
    }
    const input = el('input', { type: 'password', placeholder: 'admin token', autocomplete: 'off',
      'aria-label': 'admin token', id: 'token' });
    const form = el('form', { class: 'token', onsubmit: (ev) => {
      ev.preventDefault();
      if (input.value.trim()) setToken(input.value.trim());
      route();
    } }, input, el('button', { type: 'submit' }, 'use'));
    append(box, [form]);
  }

  // ---------------------------------------------------------- overview --

  const CHART_W = 720, CHART_H = 200, CHART_L = 40, CHART_B = 22;

  function chart(counts, throughput) {
    const now = Math.floor(Number(counts.now) / 60) * 60;
    const minutes = [];
    for (let i = 59; i >= 0; i--) minutes.push(now - i * 60);
    const by = new Map(minutes.map((m) => [m, {}]));
    const seen = new Set();
    for (const r of throughput) {
      const m = by.get(Number(r.minute));
      if (!m) continue;
      m[r.status] = (m[r.status] || 0) + Number(r.tasks);
      seen.add(r.status);
    }
    const order = STATUSES.filter((s) => seen.has(s));
    let max = 1;
    for (const m of by.values()) max = Math.max(max, Object.values(m).reduce((a, b) => a + b, 0));
    const step = niceStep(max);
    const top = Math.ceil(max / step) * step;
    const plotW = CHART_W - CHART_L - 8, plotH = CHART_H - CHART_B - 8;
    const bw = plotW / 60;
    const s = svg('svg', { viewBox: '0 0 ' + CHART_W + ' ' + CHART_H, class: 'chart', role: 'img',
      'aria-label': 'tasks finished per minute over the last hour, by status' });
    for (let v = 0; v <= top; v += step) {
      const y = 8 + plotH - (v / top) * plotH;
      s.appendChild(svg('line', { x1: CHART_L, x2: CHART_W - 8, y1: y, y2: y, class: 'grid' }));
      s.appendChild(svg('text', { x: CHART_L - 6, y: y + 4, class: 'axis', 'text-anchor': 'end' }, num(v)));
    }
    minutes.forEach((m, i) => {
      const x = CHART_L + i * bw;
      let y = 8 + plotH;
      const total = Object.values(by.get(m)).reduce((a, b) => a + b, 0);
      const g = svg('g', {}, svg('title', {}, clock(m) + ': ' + num(total) + ' finished' +
        order.filter((st) => by.get(m)[st]).map((st) => ', ' + st + ' ' + num(by.get(m)[st])).join('')));
      for (const st of order) {
        const n = by.get(m)[st] || 0;
        if (!n) continue;
        const h = (n / top) * plotH;
        y -= h;
        g.appendChild(svg('rect', { x: x + 1, y, width: Math.max(1, bw - 2), height: h, class: 'bar st-' + st }));
      }
      s.appendChild(g);
      if (i % 10 === 0 || i === 59) {
        s.appendChild(svg('text', { x: x + bw / 2, y: CHART_H - 6, class: 'axis', 'text-anchor': 'middle' }, clock(m)));
      }
    });
    const legend = el('div', { class: 'legend' }, order.length ? order.map((st) =>
      el('span', {}, el('i', { class: 'swatch st-' + st }), st)) : el('span', { class: 'muted' }, 'no task finished in the last hour'));
    return el('div', {}, s, legend);
  }

  function niceStep(max) {
    const raw = max / 4;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const k of [1, 2, 5, 10]) if (k * p >= raw) return Math.max(1, k * p);
    return Math.max(1, 10 * p);
  }
  function clock(epoch) { const d = new Date(epoch * 1000); return pad(d.getHours()) + ':' + pad(d.getMinutes()); }

  function card(label, value, sub, cls) {
    return el('div', { class: 'card ' + (cls || '') }, el('div', { class: 'label' }, label),
      el('div', { class: 'value' }, value), sub ? el('div', { class: 'sub' }, sub) : null);
  }

  function queuesTable(q) {
    if (!q) return el('p', { class: 'muted' }, 'Queue depths unavailable.');
    const rows = [];
    const lanes = q.queues.filter((x) => x.group === 'lane');
    const sum = (list, f) => list.some((x) => x[f] !== null && x[f] !== undefined)
      ? list.reduce((a, x) => a + (x[f] || 0), 0) : null;
    const row = (name, x, extra) => el('tr', {}, el('td', { class: 'mono' }, name, extra || null),
      el('td', { class: 'num' }, num(x.ready)), el('td', { class: 'num' }, num(x.unacked)),
      el('td', { class: 'num' }, num(x.consumers)),
      el('td', { class: 'muted small' }, x.error || ''));
    for (const x of q.queues.filter((x) => x.group === 'tasks')) rows.push(row(x.name, x, ' (ingress)'));
    if (lanes.length) {
      const errs = lanes.filter((x) => x.error);
      const agg = { ready: sum(lanes, 'ready'), unacked: sum(lanes, 'unacked'), consumers: sum(lanes, 'consumers'),
        error: errs.length ? errs.length + ' of ' + lanes.length + ' unreadable: ' + errs[0].error : '' };
      const busiest = Math.max(0, ...lanes.map((x) => x.ready || 0));
      const tr = row(lanes[0].name.replace(/\d+$/, '') + '0…' + (lanes.length - 1), agg,
        busiest ? ' (busiest ' + num(busiest) + ')' : null);
      if (busiest) tr.children[0].appendChild(laneBars(lanes, busiest));
      rows.push(tr);
    }
    for (const x of q.queues.filter((x) => x.group === 'retry')) rows.push(row(x.name, x, ' (retry)'));
    for (const x of q.queues.filter((x) => x.group === 'dead')) rows.push(row(x.name, x, ' (dead letters)'));
    const viaBroker = q.queues.filter((x) => x.via === 'amqp').length;
    const src = q.source === 'management' ? 'from the management API' + (viaBroker
      ? ' (ready of ' + viaBroker + ' from the broker: the API has no statistics of them yet)' : '')
      : 'ready from the broker (passive declare); unacked needs amqp.management_url' +
        (q.management_error ? ' — the management API failed: ' + q.management_error : '');
    return el('div', {}, el('table', { class: 'grid-table' },
      el('thead', {}, el('tr', {}, el('th', {}, 'queue'), el('th', { class: 'num' }, 'ready'),
        el('th', { class: 'num' }, 'unacked'), el('th', { class: 'num' }, 'consumers'), el('th', {}, ''))),
      el('tbody', {}, rows)), el('p', { class: 'muted small' }, 'Depths ' + src + '.'));
  }

  function laneBars(lanes, busiest) {
    const w = 4 * lanes.length;
    const s = svg('svg', { viewBox: '0 0 ' + w + ' 16', class: 'lanes', width: w, height: 16,
      'aria-label': 'ready messages per lane' });
    lanes.forEach((x, i) => {
      const h = busiest ? Math.max(x.ready ? 1 : 0, Math.round(((x.ready || 0) / busiest) * 16)) : 0;
      s.appendChild(svg('rect', { x: i * 4, y: 16 - h, width: 3, height: h, class: 'lanebar' },
        svg('title', {}, x.name + ': ' + num(x.ready))));
    });
    return el('div', { class: 'lanewrap' }, s);
  }

  function saturation(frac) {
    const f = frac === null || frac === undefined ? 0 : Math.min(1, Math.max(0, Number(frac)));
    const s = svg('svg', { viewBox: '0 0 100 10', class: 'meter', preserveAspectRatio: 'none' },
      svg('rect', { x: 0, y: 0, width: 100, height: 10, class: 'meter-bg' }),
      svg('rect', { x: 0, y: 0, width: f * 100, height: 10, class: f > 0.9 ? 'meter-hot' : f > 0.6 ? 'meter-warm' : 'meter-ok' }));
    return el('span', { class: 'meterwrap' }, s, ' ' + Math.round(f * 100) + '%');
  }

  async function overview(seq) {
    const [ov, q] = await Promise.all([api('/api/overview'), api('/api/queues').catch((e) => ({ failed: e.message }))]);
    if (seq !== renderSeq) return;
    const c = ov.counts, f = c.in_flight || {};
    const llm = ov.llm || [];
    const tot = (k) => llm.reduce((a, r) => a + Number(r[k] || 0), 0);
    const cards = el('div', { class: 'cards' },
      card('running', big(f.running || 0), null, 'st-running'),
      card('queued', big(f.queued || 0)),
      card('retrying', big(f.retrying || 0)),
      card('waiting', big(f.waiting || 0), 'for an answer'),
      card('finished', big(c.finished_last_hour), 'last hour; ' + num(c.finished_today) + ' today (UTC)'),
      card('dead letters', big(c.dead_letters_parked), 'parked'),
      card('LLM calls', big(tot('calls')), 'today (UTC)'),
      card('429s', big(tot('rate_limited')), 'today', tot('rate_limited') ? 'warn' : ''),
      card('tokens', big(tot('prompt_tokens') + tot('completion_tokens')), 'today'),
      card('cost', usd(tot('cost_usd')), 'today'));
    // the busiest workers; the rest in one line
    const shown = ov.running.slice(0, 12), rest = ov.running.slice(12);
    const running = ov.running.length ? el('table', { class: 'grid-table' },
      el('thead', {}, el('tr', {}, el('th', {}, 'worker'), el('th', { class: 'num' }, 'running'), el('th', {}, 'oldest started'))),
      el('tbody', {}, shown.map((r) => el('tr', {}, el('td', { class: 'mono' }, r.worker_id || '(none)'),
        el('td', { class: 'num' }, num(r.running)), el('td', {}, ago(r.oldest_started_at)))),
      rest.length ? el('tr', {}, el('td', { class: 'muted' }, rest.length + ' more workers'),
        el('td', { class: 'num' }, num(rest.reduce((a, r) => a + Number(r.running), 0))), el('td', {})) : null))
      : el('p', { class: 'muted' }, 'No task is running.');
    const llmTable = llm.length ? el('table', { class: 'grid-table' },
      el('thead', {}, el('tr', {}, ['provider', 'calls', 'ok', 'cached', '429', 'errors', 'prompt tok', 'completion tok', 'cost']
        .map((h, i) => el('th', { class: i ? 'num' : '' }, h)))),
      el('tbody', {}, llm.map((r) => el('tr', {}, el('td', { class: 'mono' }, r.provider || '(none)'),
        el('td', { class: 'num' }, num(r.calls)), el('td', { class: 'num' }, num(r.ok)),
        el('td', { class: 'num' }, num(r.cached)), el('td', { class: r.rate_limited ? 'num warn' : 'num' }, num(r.rate_limited)),
        el('td', { class: r.errors ? 'num bad' : 'num' }, num(r.errors)), el('td', { class: 'num' }, num(r.prompt_tokens)),
        el('td', { class: 'num' }, num(r.completion_tokens)), el('td', { class: 'num' }, usd(r.cost_usd))))))
      : el('p', { class: 'muted' }, 'No LLM call today (UTC).');
    const limits = ov.limits.length ? el('table', { class: 'grid-table' },
      el('thead', {}, el('tr', {}, el('th', {}, 'bucket'), el('th', {}, 'in use'), el('th', { class: 'num' }, 'available'),
        el('th', { class: 'num' }, 'capacity'), el('th', { class: 'num' }, 'refill/s'), el('th', {}, ''))),
      el('tbody', {}, ov.limits.map((b) => el('tr', {}, el('td', { class: 'mono' }, b.name), el('td', {}, saturation(b.saturation)),
        el('td', { class: 'num' }, num(Math.floor(b.available))), el('td', { class: 'num' }, num(b.capacity)),
        el('td', { class: 'num' }, num(Math.round(b.refill_per_sec * 10) / 10)),
        el('td', { class: b.paused_until ? 'bad' : '' }, b.paused_until ? 'paused until ' + when(b.paused_until) : '')))))
      : el('p', { class: 'muted' }, 'No fleet rate-limit bucket (limits.mode is local, or no worker started yet).');
    show(cards,
      el('section', {}, el('h2', {}, 'Queues'), q && q.failed ? el('p', { class: 'error' }, 'Queue depths: ' + q.failed) : queuesTable(q)),
      el('section', {}, el('h2', {}, 'Tasks finished per minute, last hour'), chart(c, ov.throughput)),
      el('div', { class: 'two' },
        el('section', {}, el('h2', {}, 'Running tasks by worker'), running),
        el('section', {}, el('h2', {}, 'Rate limits (fleet buckets)'), limits)),
      el('section', {}, el('h2', {}, 'LLM calls today (UTC) by provider'), llmTable));
    stamp();
    again(() => overview(seq), seq);
  }

  // ------------------------------------------------------------- tasks --

  function periodFrom(p) {
    const m = /^(\d+)([hd])$/.exec(p || '');
    if (!m) return '';
    return new Date(Date.now() - Number(m[1]) * (m[2] === 'h' ? 3600e3 : 86400e3)).toISOString();
  }

  async function tasks(seq, params) {
    const q = new URLSearchParams();
    if (params.get('status')) q.set('status', params.get('status'));
    if (params.get('user')) q.set('user', params.get('user'));
    if (params.get('period')) q.set('from', periodFrom(params.get('period')));
    if (params.get('before')) q.set('before', params.get('before'));
    const r = await api('/api/tasks?' + q.toString());
    if (seq !== renderSeq) return;
    const status = el('select', { name: 'status', 'aria-label': 'status' }, el('option', { value: '' }, 'any status'),
      STATUSES.map((s) => el('option', { value: s, selected: params.get('status') === s }, s)));
    const user = el('input', { name: 'user', placeholder: 'user', value: params.get('user') || '', 'aria-label': 'user' });
    const period = el('select', { name: 'period', 'aria-label': 'time' },
      PERIODS.map(([v, label]) => el('option', { value: v, selected: (params.get('period') || '') === v }, label)));
    const form = el('form', { class: 'filters', onsubmit: (ev) => {
      ev.preventDefault();
      const p = new URLSearchParams();
      if (status.value) p.set('status', status.value);
      if (user.value.trim()) p.set('user', user.value.trim());
      if (period.value) p.set('period', period.value);
      location.hash = '#/tasks' + (p.toString() ? '?' + p.toString() : '');
    } }, status, user, period, el('button', { type: 'submit' }, 'filter'),
    el('a', { href: '#/tasks', class: 'button-like' }, 'clear'));
    const rows = r.tasks.map((t) => el('tr', { 'data-task': t.task_id },
      el('td', { class: 'nowrap', title: t.enqueued_at ? 'enqueued ' + when(t.enqueued_at) : 'no enqueue time (rejected before a claim)' },
        when(t.listed_at)),
      el('td', {}, taskLink(t.task_id, shortId(t.task_id))),
      el('td', { class: 'mono' }, t.user_id),
      el('td', {}, pill(t.status)),
      el('td', { class: 'goal' }, t.goal + (t.goal_bytes > 240 ? '…' : '')),
      el('td', { class: 'num' }, num(t.steps)),
      el('td', { class: 'num' }, usd(t.cost_usd)),
      el('td', { class: 'num nowrap' }, t.started_at && t.finished_at
        ? span((new Date(t.finished_at) - new Date(t.started_at)) / 1000) : '')));
    const pager = el('div', { class: 'pager' },
      params.get('before') ? el('a', { href: hashWith(params, { before: null }), class: 'button-like' }, '← newest') : null,
      r.more ? el('a', { href: hashWith(params, { before: r.next }), class: 'button-like', id: 'older' }, 'older →') : null);
    show(el('h1', {}, 'Tasks'), form,
      rows.length ? el('table', { class: 'grid-table tasks' },
        el('thead', {}, el('tr', {}, ['listed', 'task', 'user', 'status', 'goal', 'steps', 'cost', 'ran']
          .map((h, i) => el('th', { class: i >= 5 ? 'num' : '' }, h)))),
        el('tbody', {}, rows)) : el('p', { class: 'muted' }, 'No task matches.'),
      pager);
    stamp();
  }

  function hashWith(params, change) {
    const p = new URLSearchParams(params);
    for (const [k, v] of Object.entries(change)) {
      if (v === null) p.delete(k);
      else p.set(k, v);
    }
    return '#/tasks' + (p.toString() ? '?' + p.toString() : '');
  }

  // -------------------------------------------------------------- task --

  function field(label, value) {
    return [el('dt', {}, label), el('dd', {}, value === null || value === undefined || value === '' ? '—' : value)];
  }

  function timeline(steps) {
    if (!steps.length) return el('p', { class: 'muted' }, 'No step yet.');
    const t0 = Math.min(...steps.map((s) => s.started_at ? new Date(s.started_at).getTime() : Infinity));
    const t1 = Math.max(...steps.map((s) => s.started_at ? new Date(s.started_at).getTime() + (s.duration_ms || 0) : -Infinity));
    const total = Math.max(1, t1 - t0);
    const bar = (s) => {
      if (!s.started_at || !isFinite(t0)) return '';
      const x = ((new Date(s.started_at).getTime() - t0) / total) * 200;
      const w = Math.max(1, ((s.duration_ms || 0) / total) * 200);
      return svg('svg', { viewBox: '0 0 200 10', class: 'gantt', preserveAspectRatio: 'none' },
        svg('rect', { x: 0, y: 0, width: 200, height: 10, class: 'gantt-bg' }),
        svg('rect', { x: Math.min(x, 199), y: 1, width: Math.min(w, 200 - Math.min(x, 199)), height: 8,
          class: 'gantt-bar k-' + s.kind + ' st-' + (s.status || 'none') }));
    };
    let attempt = null;
    const rows = [];
    for (const s of steps) {
      if (s.attempt !== attempt) {
        attempt = s.attempt;
        rows.push(el('tr', { class: 'attempt' }, el('td', { colspan: 10 }, 'attempt ' + attempt)));
      }
      const tokens = (s.prompt_tokens || 0) + (s.completion_tokens || 0);
      rows.push(el('tr', { class: 'step k-' + s.kind },
        // a tool call is STEP.N; an LLM try that did not answer is STEP try N
        el('td', { class: 'mono nowrap' }, s.step + (!s.seq ? '' : s.kind === 'llm' ? ' try ' + s.seq : '.' + s.seq)),
        el('td', {}, s.kind), el('td', { class: 'mono' }, s.name || ''), el('td', { class: 'mono' }, s.provider || ''),
        el('td', {}, pill(s.status)), el('td', { class: 'nowrap' }, when(s.started_at)),
        el('td', { class: 'num nowrap' }, ms(s.duration_ms)), el('td', {}, bar(s)),
        el('td', { class: 'num', title: s.kind === 'llm' ? num(s.prompt_tokens) + ' prompt + ' + num(s.completion_tokens) + ' completion' : '' },
          tokens ? num(tokens) : ''),
        el('td', { class: 'num' }, s.cost_usd === null || s.cost_usd === undefined ||
          (!Number(s.cost_usd) && (s.kind === 'tool' || s.seq)) ? '' : usd(s.cost_usd))));
      if (s.detail && s.status !== 'ok') {
        rows.push(el('tr', { class: 'detail' }, el('td', {}), el('td', { colspan: 9 }, el('code', {}, s.detail))));
      }
    }
    return el('table', { class: 'grid-table timeline' },
      el('thead', {}, el('tr', {}, ['step', 'kind', 'name', 'provider', 'status', 'started', 'took', 'timeline', 'tokens', 'cost']
        .map((h, i) => el('th', { class: i === 6 || i >= 8 ? 'num' : '' }, h)))),
      el('tbody', {}, rows));
  }

  function deadRows(list, withTask) {
    return list.map((d) => {
      const canRequeue = info.actions && !d.requeued_at && d.reason !== 'duplicate';
      const btn = canRequeue ? el('button', { type: 'button', class: 'small', disabled: !token(),
        title: token() ? 'publish the body to the task queue again' : 'paste the admin token first',
        onclick: async () => {
          if (!confirm('Requeue dead letter ' + d.id + '?')) return;
          if (await action('/api/dead-letters/' + encodeURIComponent(d.id) + '/requeue', 'Dead letter ' + d.id + ' requeued.')) route();
        } }, 'requeue') : null;
      return el('tr', { 'data-dead': d.id },
        el('td', { class: 'nowrap' }, when(d.recorded_at)),
        el('td', {}, el('span', { class: 'pill reason' }, d.reason)),
        withTask ? el('td', {}, d.task_id ? taskLink(d.task_id, shortId(d.task_id)) : '—') : null,
        el('td', { class: 'error-text' }, d.error || ''),
        withTask ? el('td', {}, d.body_preview === null || d.body_preview === undefined ? '—'
          : el('code', { class: 'body', title: num(d.body_bytes) + ' bytes' }, d.body_preview)) : null,
        el('td', { class: 'nowrap' }, d.requeued_at ? 'requeued ' + when(d.requeued_at) : btn || 'parked'));
    });
  }

  async function task(seq, id) {
    const r = await api('/api/tasks/' + encodeURIComponent(id));
    if (seq !== renderSeq) return;
    const t = r.task;
    const cancel = info.actions && !t.final ? el('button', { type: 'button', id: 'cancel', disabled: !token() || t.cancel_requested,
      title: token() ? (t.cancel_requested ? 'cancel requested already' : 'ask the worker to stop this task') : 'paste the admin token first',
      onclick: async () => {
        if (!confirm('Cancel task ' + t.task_id + '?')) return;
        if (await action('/api/tasks/' + encodeURIComponent(t.task_id) + '/cancel', 'Cancel requested for ' + t.task_id + '.')) route();
      } }, t.cancel_requested ? 'cancel requested' : 'cancel task') : null;
    const ran = t.started_at ? span(Number(t.run_seconds || 0)) + ' of running time' : '';
    const facts = el('dl', { class: 'facts' },
      field('status', [pill(t.status), t.cancel_requested && !t.final ? el('span', { class: 'muted' }, ' cancel requested') : null]),
      field('user', el('span', { class: 'mono' }, t.user_id)),
      field('model', t.model), field('priority', String(t.priority)),
      field('attempts', 'attempt ' + t.attempt + ', ' + t.failures + ' failed, ' + t.interruptions + ' interrupted'),
      field('steps', num(t.steps) + (t.max_steps ? ' of ' + t.max_steps : '')),
      field('tokens', num(t.prompt_tokens) + ' prompt + ' + num(t.completion_tokens) + ' completion'),
      field('cost', usd(t.cost_usd) + (t.budget_usd ? ' of ' + usd(t.budget_usd) : '')),
      field('enqueued', when(t.enqueued_at)), field('started', when(t.started_at)),
      field('finished', t.finished_at ? when(t.finished_at) + ' (' + ran + ')'
        : t.started_at && !t.final ? 'not yet (started ' + ago(t.started_at) + ')' : null),
      field('worker', t.worker_id ? el('span', { class: 'mono' }, t.worker_id) : null));
    const text = (label, v, cls) => v === null || v === undefined ? null
      : el('section', {}, el('h2', {}, label), el('pre', { class: 'text ' + (cls || '') }, v));
    show(el('h1', {}, 'Task ', el('span', { class: 'mono' }, t.task_id), ' ', cancel),
      facts,
      text('Goal', t.goal, 'goal-text'),
      text('Question (waiting for an answer)', t.question),
      text('Result', t.result, 'result-text'),
      text('Error', t.error, 'error-text'),
      t.metadata ? text('Metadata', JSON.stringify(t.metadata, null, 2)) : null,
      el('section', {}, el('h2', {}, 'Steps'), timeline(r.steps)),
      r.dead_letters.length ? el('section', {}, el('h2', {}, 'Dead letters'),
        el('table', { class: 'grid-table' }, el('thead', {}, el('tr', {}, ['recorded', 'reason', 'error', ''].map((h) => el('th', {}, h)))),
          el('tbody', {}, deadRows(r.dead_letters, false)))) : null);
    stamp();
    if (!t.final) again(() => task(seq, id), seq);
  }

  // -------------------------------------------------------------- dead --

  async function dead(seq, params) {
    const q = new URLSearchParams();
    if (params.get('reason')) q.set('reason', params.get('reason'));
    q.set('parked', params.get('parked') === '0' ? '0' : '1');
    if (params.get('before')) q.set('before', params.get('before'));
    const r = await api('/api/dead-letters?' + q.toString());
    if (seq !== renderSeq) return;
    const reason = el('select', { name: 'reason', 'aria-label': 'reason' }, el('option', { value: '' }, 'any reason'),
      r.reasons.map((x) => el('option', { value: x.reason, selected: params.get('reason') === x.reason },
        x.reason + ' (' + num(x.parked) + ' parked, ' + num(x.total) + ')')));
    const parked = el('input', { type: 'checkbox', name: 'parked', checked: params.get('parked') !== '0', id: 'parked' });
    const go = (change) => {
      const p = new URLSearchParams();
      if (reason.value) p.set('reason', reason.value);
      if (!parked.checked) p.set('parked', '0');
      for (const [k, v] of Object.entries(change || {})) p.set(k, v);
      location.hash = '#/dead' + (p.toString() ? '?' + p.toString() : '');
    };
    const form = el('form', { class: 'filters', onsubmit: (ev) => { ev.preventDefault(); go(); } },
      reason, el('label', { for: 'parked' }, parked, ' parked only'), el('button', { type: 'submit' }, 'filter'));
    show(el('h1', {}, 'Dead letters'), form,
      r.dead_letters.length ? el('table', { class: 'grid-table dead' },
        el('thead', {}, el('tr', {}, ['recorded', 'reason', 'task', 'error', 'body', ''].map((h) => el('th', {}, h)))),
        el('tbody', {}, deadRows(r.dead_letters, true))) : el('p', { class: 'muted' }, 'No dead letter matches.'),
      el('div', { class: 'pager' },
        params.get('before') ? el('button', { type: 'button', onclick: () => go({}) }, '← newest') : null,
        r.more ? el('button', { type: 'button', onclick: () => go({ before: r.next }) }, 'older →') : null));
    stamp();
  }

  // ------------------------------------------------------------ router --

  function stamp() { document.getElementById('updated').textContent = 'updated ' + when(new Date().toISOString()); }

  function again(fn, seq) {
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (seq !== renderSeq) return;
      if (document.hidden) { again(fn, seq); return; }
      fn().catch((e) => fail(e, seq));
    }, REFRESH_MS);
  }

  function fail(e, seq) {
    if (seq !== renderSeq) return;
    show(el('p', { class: 'error' }, e.message), el('p', { class: 'muted' }, 'Trying again in a few seconds.'));
    again(route, seq);
  }

  function route() {
    clearTimeout(timer);
    const seq = ++renderSeq;
    const hash = location.hash.replace(/^#/, '') || '/';
    const [path, qs] = hash.split('?');
    const params = new URLSearchParams(qs || '');
    let page = 'overview', run;
    let m;
    if (path === '/tasks') { page = 'tasks'; run = () => tasks(seq, params); }
    else if ((m = /^\/task\/([^/]+)$/.exec(path))) { page = 'tasks'; run = () => task(seq, decodeURIComponent(m[1])); }
    else if (path === '/dead') { page = 'dead'; run = () => dead(seq, params); }
    else run = () => overview(seq);
    for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.page === page);
    drawAdmin();
    run().catch((e) => fail(e, seq));
  }

  async function start() {
    try {
      info = await api('/api/info');
    } catch (e) {
      notice('The dashboard does not answer: ' + e.message, 'error');
    }
    window.addEventListener('hashchange', () => { notice(''); route(); });
    route();
  }

  start();
})();
