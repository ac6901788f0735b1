/* retention.h — keeps a fleet's history bounded (retention.older_than):
 * every retention.interval_seconds, finished tasks with their steps and
 * dead letters older than that are deleted by agentq.prune()
 * (sql/016_visibility.sql), retention.batch rows per transaction, so no
 * long lock is held and the writers never wait on it.
 *
 * One thread with its own PostgreSQL connection, made when a round
 * starts and kept; a round the database refuses is logged and tried
 * again at the next interval. Every worker of a fleet may run it at once:
 * agentq.prune skips rows another transaction holds. Running tasks and
 * their rows are never touched. */
#ifndef AGENTQ_RETENTION_H
#define AGENTQ_RETENTION_H

#include "agentq/common.h"

typedef struct aq_retention aq_retention;

/* Starts pruning rows older than `older_than_s` seconds every
 * `interval_s` seconds (the first round after one interval), `batch`
 * rows per transaction; `dsn` is copied. Returns NULL and fills err if
 * the thread cannot start. */
aq_retention *aq_retention_new(const char *dsn, long long older_than_s, int interval_s, int batch, char *err,
                               size_t errlen);

/* Stops the thread (a round in progress ends after its current batch)
 * and frees. NULL is allowed. */
void aq_retention_free(aq_retention *r);

#endif
