/* status.c — the status name table (see status.h). */
#include "agentq/status.h"

#include <string.h>

static const char *const names[AQ_STATUS_COUNT] = {
    [AQ_STATUS_NONE] = "none",             [AQ_STATUS_QUEUED] = "queued",         [AQ_STATUS_RUNNING] = "running",
    [AQ_STATUS_RETRYING] = "retrying",     [AQ_STATUS_WAITING] = "waiting",     [AQ_STATUS_COMPLETED] = "completed",
    [AQ_STATUS_FAILED] = "failed",         [AQ_STATUS_TIMEOUT] = "timeout",
    [AQ_STATUS_BUDGET_EXCEEDED] = "budget_exceeded", [AQ_STATUS_MAX_STEPS] = "max_steps",
    [AQ_STATUS_CANCELLED] = "cancelled",   [AQ_STATUS_EXPIRED] = "expired",
    [AQ_STATUS_REJECTED] = "rejected",
};

const char *aq_status_name(aq_status s) { return s >= 0 && s < AQ_STATUS_COUNT ? names[s] : "?"; }

aq_status aq_status_parse(const char *name)
{
    for (int i = AQ_STATUS_QUEUED; name && i < AQ_STATUS_COUNT; i++)
        if (!strcmp(name, names[i])) return (aq_status)i;
    return AQ_STATUS_NONE;
}

bool aq_status_final(aq_status s) { return s >= AQ_STATUS_COMPLETED && s < AQ_STATUS_COUNT; }
