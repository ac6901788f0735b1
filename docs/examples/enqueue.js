#!/usr/bin/env node
// Enqueue one agentq task from Node.js with amqplib, and print its task id.
//
//   npm install amqplib        (or `npm install` here: see package.json)
//   AGENTQ_AMQP_URL=amqp://user:pass@host:5672/%2f \
//       node enqueue.js --user alice --skills calculator "What is 17*23?"
//
// Publishes the task (see docs/contract.md, "The task message") to exchange
// `agentq` (AGENTQ_AMQP_EXCHANGE), routing key `task`: persistent,
// content_type application/json, with a priority, an optional expiration
// and a task_id of its own, on a confirm channel. It exits 0 once the
// broker has confirmed the message, 1 if the broker refused it or nothing
// is bound to take it (no worker has declared the topology yet), 2 on bad
// arguments. Needs Node.js 18 or later.
'use strict';

const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

function usage(msg) {
  if (msg) console.error(`enqueue.js: ${msg}`);
  console.error('usage: enqueue.js [--user U] [--priority 0-9] [--expiration MS] [--skills A,B]\n' +
                '                  [--max-steps N] [--budget USD] [--timeout S] GOAL');
  process.exit(2);
}

function number(name, text, min, max) {
  const v = Number(text);
  if (text === undefined || text === '' || !Number.isFinite(v) || v < min || v > max)
    usage(`--${name} wants a number from ${min} to ${max}, not '${text}'`);
  return v;
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        user: { type: 'string', default: 'alice' },
        priority: { type: 'string', default: '0' },
        expiration: { type: 'string' },
        skills: { type: 'string' },
        'max-steps': { type: 'string', default: '10' },
        budget: { type: 'string', default: '0.20' },
        timeout: { type: 'string', default: '120' },
      },
    });
  } catch (e) {
    usage(e.message);
  }
  const { values: o, positionals } = parsed;
  if (positionals.length !== 1) usage('give the goal as one argument');

  const priority = number('priority', o.priority, 0, 9);
  if (!Number.isInteger(priority)) usage('--priority wants an integer from 0 to 9');
  const taskId = randomUUID();
  const task = {
    task_id: taskId,
    user_id: o.user,
    goal: positionals[0],
    max_steps: number('max-steps', o['max-steps'], 1, 100),
    budget_usd: number('budget', o.budget, 0, 1e6),
    timeout_seconds: number('timeout', o.timeout, 0.001, 86400),
    metadata: { source: 'docs/examples/enqueue.js' },
  };
  if (o.skills) task.skills = o.skills.split(',').filter(Boolean);

  const options = {
    persistent: true, // delivery_mode 2
    contentType: 'application/json',
    priority, // 0-9, higher runs first
    messageId: taskId,
    timestamp: Math.floor(Date.now() / 1000), // becomes agentq.tasks.enqueued_at
    mandatory: true, // returned if no queue is bound
  };
  if (o.expiration !== undefined) options.expiration = String(number('expiration', o.expiration, 0, 2 ** 32 - 1));

  const url = process.env.AGENTQ_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
  const exchange = process.env.AGENTQ_AMQP_EXCHANGE || 'agentq';
  let conn;
  try {
    conn = await amqp.connect(url);
    conn.on('error', () => {}); // reported through the failed publish below
    const ch = await conn.createConfirmChannel();
    let channelError = null;
    let returned = false;
    ch.on('error', (e) => { channelError = e; }); // e.g. 404: no such exchange
    ch.on('return', () => { returned = true; }); // arrives before the confirm
    try {
      await new Promise((resolve, reject) =>
        ch.publish(exchange, 'task', Buffer.from(JSON.stringify(task)), options,
                   (err) => (err ? reject(err) : resolve())));
    } catch (e) {
      throw channelError || e;
    }
    if (returned) {
      console.error(`enqueue.js: nothing is bound to exchange '${exchange}' with key 'task' ` +
                    '(start a worker once: it declares the queues)');
      process.exitCode = 1;
      return;
    }
  } catch (e) {
    console.error(`enqueue.js: publish failed: ${e.message}`);
    process.exitCode = 1;
    return;
  } finally {
    if (conn) await conn.close().catch(() => {});
  }
  console.log(taskId);
}

main();
