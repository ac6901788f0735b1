#!/usr/bin/env bash
# Enqueue one agentq task from the shell with amqp-publish, and print its
# task id.
#
#   AGENTQ_AMQP_URL=amqp://user:pass@host:5672/%2f \
#       ./enqueue.sh --user alice --skills calculator "What is 17*23?"
#
# Publishes the task (see docs/contract.md, "The task message") to exchange
# `agentq` (AGENTQ_AMQP_EXCHANGE), routing key `task`: persistent,
# content_type application/json, with a task_id of its own in the body
# (where the worker looks first).
#
# What amqp-publish cannot do: publisher confirms, the mandatory flag, and
# the priority, expiration, message_id and timestamp properties. So the
# task runs at priority 0 with no expiration, its enqueued_at is when a
# worker first saw it, and exit status 0 means the broker took the message
# on a cleanly closed connection, not that it confirmed it to a queue (a
# publish to an exchange with nothing bound is dropped silently). Where that
# matters, use `agentq-producer` (confirms, --priority, --ttl) or the Python
# and Node examples beside this one.
#
# Needs amqp-publish (Debian: amqp-tools) and jq (to build the JSON).
set -euo pipefail

usage() {
    [[ -n "${1:-}" ]] && echo "enqueue.sh: $1" >&2
    echo "usage: enqueue.sh [--user U] [--skills A,B] [--max-steps N] [--budget USD] [--timeout S] GOAL" >&2
    exit 2
}

user=alice skills="" max_steps=10 budget=0.20 timeout=120 goal=""
while (($#)); do
    case "$1" in
    --user) user=${2:?}; shift ;;
    --skills) skills=${2:?}; shift ;;
    --max-steps) max_steps=${2:?}; shift ;;
    --budget) budget=${2:?}; shift ;;
    --timeout) timeout=${2:?}; shift ;;
    -h | --help) usage ;;
    -*) usage "unknown option $1" ;;
    *) [[ -z "$goal" ]] || usage "give the goal as one argument"; goal=$1 ;;
    esac
    shift
done
[[ -n "$goal" ]] || usage "no goal"
for n in "$max_steps" "$budget" "$timeout"; do
    [[ "$n" =~ ^[0-9]+([.][0-9]+)?$ ]] || usage "not a number: '$n'"
done

task_id=$(cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen)
# jq writes the JSON, so any goal (quotes, newlines, UTF-8) is escaped right.
body=$(jq -cn --arg task_id "$task_id" --arg user "$user" --arg goal "$goal" --arg skills "$skills" \
    --argjson max_steps "$max_steps" --argjson budget "$budget" --argjson timeout "$timeout" '
    {task_id: $task_id, user_id: $user, goal: $goal, max_steps: $max_steps,
     budget_usd: $budget, timeout_seconds: $timeout,
     metadata: {source: "docs/examples/enqueue.sh"}}
    + (if $skills == "" then {} else {skills: ($skills | split(",") | map(select(. != "")))} end)')

amqp-publish --url="${AGENTQ_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}" \
    --exchange="${AGENTQ_AMQP_EXCHANGE:-agentq}" --routing-key=task \
    --persistent --content-type=application/json --body="$body"
echo "$task_id"
