/* status.h — the statuses a task takes, as one enum and one name table.
 * The names are agentq.tasks.status's (sql/, docs/contract.md): the code
 * passes the enum and turns it into a name only where a row is written or
 * a line logged, and back where a row is read. */
#ifndef AGENTQ_STATUS_H
#define AGENTQ_STATUS_H

#include "agentq/common.h"

typedef enum aq_status {
    /* "no status" (a dead letter that leaves the row alone, a session not
     * stopped yet): zero, so a zeroed struct says none */
    AQ_STATUS_NONE = 0,
    /* not final */
    AQ_STATUS_QUEUED,
    AQ_STATUS_RUNNING,
    AQ_STATUS_RETRYING,
    AQ_STATUS_WAITING,    /* for an answer to its question (ask_human) */
    /* final: a task never leaves these (agentq.is_final) */
    AQ_STATUS_COMPLETED,
    AQ_STATUS_FAILED,
    AQ_STATUS_TIMEOUT,
    AQ_STATUS_BUDGET_EXCEEDED,
    AQ_STATUS_MAX_STEPS,
    AQ_STATUS_CANCELLED,
    AQ_STATUS_EXPIRED,
    AQ_STATUS_REJECTED,
    AQ_STATUS_COUNT
} aq_status;

/* Its name ("budget_exceeded"); "none" for AQ_STATUS_NONE, "?" for a
 * value that is no status. */
const char *aq_status_name(aq_status s);

/* The status named `name`, or AQ_STATUS_NONE (NULL or unknown). */
aq_status aq_status_parse(const char *name);

/* True for the statuses a task never leaves. */
bool aq_status_final(aq_status s);

#endif
