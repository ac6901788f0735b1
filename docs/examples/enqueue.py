#!/usr/bin/env python3
"""Enqueue one agentq task from Python with pika, and print its task id.

    AGENTQ_AMQP_URL=amqp://user:pass@host:5672/%2f \
        python3 enqueue.py --user alice --skills calculator "What is 17*23?"

Publishes the task (see docs/contract.md, "The task message") to exchange
`agentq` (AGENTQ_AMQP_EXCHANGE), routing key `task`: persistent,
content_type application/json, with a priority, an optional expiration and
a task_id of its own, under publisher confirms. It exits 0 once the broker
has confirmed the message, 1 if the broker refused it or nothing is bound
to take it (no worker has declared the topology yet), 2 on bad arguments.

Needs pika (Debian: python3-pika; else pip install pika).
"""
import argparse
import json
import os
import sys
import time
import uuid

import pika
from pika.exceptions import AMQPError, NackError, UnroutableError


def main() -> int:
    p = argparse.ArgumentParser(description="Enqueue one agentq task.")
    p.add_argument("goal", help="what the agent should do")
    p.add_argument("--user", default="alice", help="user the task runs for (default alice)")
    p.add_argument("--priority", type=int, default=0, choices=range(10), metavar="0-9",
                   help="higher runs first (default 0)")
    p.add_argument("--expiration", type=int, metavar="MS",
                   help="drop the task if it is still queued after MS milliseconds")
    p.add_argument("--skills", help="comma-separated skills the agent may use, e.g. calculator")
    p.add_argument("--max-steps", type=int, default=10, help="LLM calls at most (1-100, default 10)")
    p.add_argument("--budget", type=float, default=0.20, help="USD at most, 0 = none (default 0.20)")
    p.add_argument("--timeout", type=float, default=120, help="running seconds at most (default 120)")
    args = p.parse_args()

    task_id = str(uuid.uuid4())
    task = {
        "task_id": task_id,
        "user_id": args.user,
        "goal": args.goal,
        "max_steps": args.max_steps,
        "budget_usd": args.budget,
        "timeout_seconds": args.timeout,
        "metadata": {"source": "docs/examples/enqueue.py"},
    }
    if args.skills:
        task["skills"] = [s for s in args.skills.split(",") if s]

    props = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,                  # persistent
        priority=args.priority,           # 0-9, higher runs first
        message_id=task_id,
        timestamp=int(time.time()),       # becomes agentq.tasks.enqueued_at
        expiration=str(args.expiration) if args.expiration is not None else None)

    url = os.environ.get("AGENTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("AGENTQ_AMQP_EXCHANGE", "agentq")
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()  # basic_publish now waits for the broker's ack
            ch.basic_publish(exchange=exchange, routing_key="task",
                             body=json.dumps(task).encode(), properties=props,
                             mandatory=True)  # returned (UnroutableError) if no queue is bound
        finally:
            if conn.is_open:
                conn.close()
    except UnroutableError:
        print(f"enqueue.py: nothing is bound to exchange {exchange!r} with key 'task' "
              "(start a worker once: it declares the queues)", file=sys.stderr)
        return 1
    except NackError:
        print("enqueue.py: the broker refused the message (nack)", file=sys.stderr)
        return 1
    except AMQPError as e:
        print(f"enqueue.py: publish failed: {e!r}", file=sys.stderr)
        return 1
    print(task_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
