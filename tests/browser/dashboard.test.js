// dashboard.test.js — the dashboard's pages in headless Chromium
// (playwright-core), against the tasks tests/browser/run made: run it
// through that script, which sets the DASH_* variables. Each page is
// saved as a screenshot in DASH_SHOTS.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const path = require('node:path');
const { chromium } = require('playwright-core');

const E = process.env;
const ADMIN = E.DASH_URL_ADMIN, RO = E.DASH_URL_RO, TOKEN = E.DASH_ADMIN_TOKEN;
const REFUSED = /the server responded with a status of (403|405) /;
let browser;

function sql(q) {
  return execFileSync(E.DASH_PSQL, ['-X', '-A', '-t', '-q', '-d', E.DASH_DB, '-c', q], { encoding: 'utf8' }).trim();
}

async function waitFor(fn, ms, what) {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// A page that records what the console says: an error there (a CSP
// violation is one) fails the test that opened it.
async function open(base, hash) {
  const ctx = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await ctx.newPage();
  page.errors = [];
  page.on('console', (m) => { if (m.type() === 'error') page.errors.push(m.text()); });
  page.on('pageerror', (e) => page.errors.push(String(e)));
  page.on('dialog', (d) => d.accept());
  await page.goto(base + '/' + (hash || ''));
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(E.DASH_SHOTS, name + '.png'), fullPage: true });
}

// `expected`: console lines the test provoked itself (Chromium logs every
// 4xx answer to fetch as an error).
async function done(page, expected) {
  const errors = page.errors.filter((e) => !(expected && expected.test(e)));
  assert.deepEqual(errors, [], 'console errors');
  await page.context().close();
}

before(async () => {
  browser = await chromium.launch({ executablePath: E.DASH_CHROMIUM, headless: true, args: ['--no-sandbox'] });
});

after(async () => {
  if (browser) await browser.close();
});

test('the overview loads with numbers', async () => {
  const page = await open(ADMIN, '#/');
  await page.waitForSelector('.cards .card');
  const cards = await page.$$eval('.cards .card', (cs) => Object.fromEntries(cs.map((c) =>
    [c.querySelector('.label').textContent, c.querySelector('.value').textContent])));
  const n = (s) => Number(String(s).replace(/[,$]/g, ''));
  assert.equal(n(cards.running), 1, 'the slow task runs');
  assert.ok(n(cards.finished) >= 10, 'finished: ' + cards.finished);
  assert.ok(n(cards['LLM calls']) >= 10, 'LLM calls: ' + cards['LLM calls']);
  assert.ok(n(cards.tokens) > 0, 'tokens: ' + cards.tokens);
  assert.ok(n(cards['dead letters']) >= 1, 'dead letters: ' + cards['dead letters']);
  // the chart drew bars, the queues table names this run's queues
  assert.ok(await page.$$eval('svg.chart rect.bar', (b) => b.length) >= 1, 'no bar in the chart');
  const queues = await page.$$eval('section table.grid-table tbody tr td:first-child', (t) => t.map((x) => x.textContent));
  // ready is a number (0) for every queue of this run: from the
  // management API, or from the broker for a queue it has no statistics
  // of yet (it declared them seconds ago)
  const ready = await page.$$eval('section table.grid-table tbody tr', (rs) => rs
    .filter((r) => r.children.length === 5).map((r) => r.children[1].textContent));
  assert.ok(ready.length >= 4 && ready.every((x) => /^\d[\d,]*$/.test(x)), 'ready: ' + ready.join(' | '));
  assert.ok(queues.some((q) => q.startsWith(E.AGENTQ_AMQP_QUEUE)), 'queues: ' + queues.join(' | '));
  assert.ok(queues.some((q) => q.startsWith(E.AGENTQ_AMQP_DEAD_QUEUE)), 'queues: ' + queues.join(' | '));
  // the LLM table names the provider, the rate limits their buckets
  const text = await page.textContent('main');
  assert.match(text, /LLM calls today \(UTC\) by provider/);
  assert.match(text, /default/, 'the llm.* provider is called default');
  await shot(page, 'overview');
  await done(page);
});

test('a task made here is in the list, and its page has the step timeline', async () => {
  const page = await open(ADMIN, '#/tasks');
  await page.waitForSelector('tr[data-task="' + E.DASH_TASK_RESEARCH + '"]');
  const rows = await page.$$eval('table.tasks tbody tr', (r) => r.length);
  assert.ok(rows >= 11, 'rows: ' + rows);
  await shot(page, 'tasks');
  // filtered by user
  await page.fill('input[name=user]', 'bob');
  await page.click('form.filters button[type=submit]');
  await page.waitForFunction(() => location.hash.includes('user=bob'));
  await page.waitForFunction(() => document.querySelectorAll('table.tasks tbody tr').length === 1);
  await page.click('tr[data-task="' + E.DASH_TASK_RESEARCH + '"] a');
  await page.waitForSelector('table.timeline');
  const steps = await page.$$eval('table.timeline tr.step', (r) => r.map((x) => [...x.children].map((c) => c.textContent)));
  // research steps=3 parallel=2: 4 LLM calls and 3 x 2 tool calls
  assert.equal(steps.filter((s) => s[1] === 'llm').length, 4, JSON.stringify(steps));
  assert.equal(steps.filter((s) => s[1] === 'tool').length, 6, JSON.stringify(steps));
  assert.ok(steps.every((s) => s[4] === 'ok'), 'every step ok');
  assert.ok(steps.filter((s) => s[1] === 'llm').every((s) => s[3] === 'default'), 'provider column');
  assert.ok(await page.$$eval('svg.gantt rect.gantt-bar', (b) => b.length) === 10, 'a bar per step');
  assert.match(await page.textContent('dl.facts'), /completed/);
  await shot(page, 'task');
  await done(page);
});

test('a <script> goal is text, never markup', async () => {
  const page = await open(ADMIN, '#/task/' + E.DASH_TASK_SCRIPT);
  await page.waitForSelector('pre.goal-text');
  assert.equal(await page.textContent('pre.goal-text'), E.DASH_SCRIPT_GOAL);
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.equal(await page.evaluate(() => document.scripts.length), 1, 'only /app.js');
  assert.equal(await page.evaluate(() => document.querySelectorAll('main img, main script').length), 0);
  await page.goto(ADMIN + '/#/tasks?user=mallory');
  await page.waitForSelector('tr[data-task="' + E.DASH_TASK_SCRIPT + '"] td.goal');
  assert.match(await page.textContent('tr[data-task="' + E.DASH_TASK_SCRIPT + '"] td.goal'), /<script>window\.__pwned=1<\/script>/);
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  // the API escapes markup too, should a browser ever take it for HTML
  const raw = await page.evaluate(async (id) => (await fetch('/api/tasks/' + id)).text(), E.DASH_TASK_SCRIPT);
  assert.ok(raw.includes('\\u003cscript\\u003e') && !raw.includes('<script'), raw.slice(0, 200));
  await shot(page, 'task-script-goal');
  await done(page);
});

test('cancel is refused without the token: 403, the row unchanged', async () => {
  const id = E.DASH_TASK_SLOW;
  const row = () => sql(`SELECT status || ' ' || cancel_requested FROM agentq.tasks WHERE task_id = '${id}'`);
  assert.equal(row(), 'running false');
  const page = await open(ADMIN, '#/task/' + id);
  await page.waitForSelector('#cancel');
  assert.ok(await page.$eval('#cancel', (b) => b.disabled), 'the button waits for the token');
  const post = (base, token) => page.evaluate(async ([url, t]) => {
    const r = await fetch(url, { method: 'POST', headers: t ? { Authorization: 'Bearer ' + t } : {} });
    return [r.status, await r.text()];
  }, [base + '/api/tasks/' + id + '/cancel', token]);
  let [status, body] = await post(ADMIN, null);
  assert.equal(status, 403, body);
  [status, body] = await post(ADMIN, TOKEN.slice(0, -1) + (TOKEN.endsWith('0') ? '1' : '0'));
  assert.equal(status, 403, body);
  const get = await page.evaluate(async (url) => (await fetch(url)).status, ADMIN + '/api/tasks/' + id + '/cancel');
  assert.equal(get, 405, 'GET is no way to cancel');
  await done(page, REFUSED);

  // the read-only dashboard: no button, and the right token does nothing there
  const ro = await open(RO, '#/task/' + id);
  await ro.waitForSelector('dl.facts');
  assert.equal(await ro.$('#cancel'), null);
  assert.equal(await ro.textContent('#admin'), 'read-only');
  const [st, b] = await ro.evaluate(async ([url, t]) => {
    const r = await fetch(url, { method: 'POST', headers: { Authorization: 'Bearer ' + t } });
    return [r.status, await r.text()];
  }, [RO + '/api/tasks/' + id + '/cancel', TOKEN]);
  assert.equal(st, 403, b);
  assert.match(b, /read-only/);
  await shot(ro, 'task-read-only');
  await done(ro, REFUSED);
  assert.equal(row(), 'running false', 'nothing changed');
});

test('cancel works with the token', async () => {
  const id = E.DASH_TASK_SLOW;
  const page = await open(ADMIN, '#/task/' + id);
  await page.waitForSelector('#token');
  await page.fill('#token', TOKEN);
  await page.click('form.token button');
  await page.waitForSelector('.badge.admin');
  await page.waitForSelector('#cancel:not([disabled])');
  await page.click('#cancel');
  await page.waitForSelector('.notice.ok');
  assert.match(await page.textContent('.notice'), /Cancel requested/);
  assert.equal(sql(`SELECT cancel_requested FROM agentq.tasks WHERE task_id = '${id}'`), 't');
  // the worker hears it and stops the task; the page follows (it refreshes while not final)
  await waitFor(() => sql(`SELECT status FROM agentq.tasks WHERE task_id = '${id}'`) === 'cancelled', 30000, 'cancelled');
  await page.waitForFunction(() => document.querySelector('dl.facts .pill').textContent === 'cancelled', null, { timeout: 15000 });
  assert.equal(await page.$('#cancel'), null, 'no cancel for a final task');
  await shot(page, 'task-cancelled');
  await done(page);
});

test('dead letters list the refused task, and requeue sends it back', async () => {
  const page = await open(ADMIN, '#/dead');
  await page.evaluate((t) => sessionStorage.setItem('agentq.dashboard.token', t), TOKEN);
  await page.reload();
  const id = sql(`SELECT id FROM agentq.dead_letters WHERE task_id = '${E.DASH_TASK_FAILED}' ORDER BY id LIMIT 1`);
  const rowSel = 'tr[data-dead="' + id + '"]';
  await page.waitForSelector(rowSel);
  const cells = await page.$$eval(rowSel + ' td', (t) => t.map((x) => x.textContent));
  assert.equal(cells[1], 'failed');
  assert.match(cells[3], /400/);
  assert.match(cells[4], /broken request fail=400/, 'the body preview');
  await shot(page, 'dead-letters');
  await page.click(rowSel + ' button');
  await page.waitForSelector('.notice.ok');
  assert.notEqual(sql(`SELECT requeued_at IS NOT NULL FROM agentq.dead_letters WHERE id = ${id}`), 'f');
  // the worker runs it again, the mock refuses it again: a second dead letter
  await waitFor(() => Number(sql(`SELECT count(*) FROM agentq.dead_letters WHERE task_id = '${E.DASH_TASK_FAILED}'`)) >= 2,
    30000, 'a second dead letter');
  await done(page);
});
