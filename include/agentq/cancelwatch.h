/* cancelwatch.h — tells the worker which of its running tasks were asked
 * to stop (`agentqctl cancel`, or UPDATE ... SET cancel_requested = true).
 *
 * One thread with its own PostgreSQL connection LISTENs on agentq_cancel
 * (a trigger NOTIFYs the task id). NOTIFY reaches only listeners connected
 * at commit time and is never replayed, so after every (re)connect the
 * thread also polls the column once for this worker's running tasks.
 * Cancellation is a hint: the worker ignores ids it is not running. */
#ifndef AGENTQ_CANCELWATCH_H
#define AGENTQ_CANCELWATCH_H

#include "agentq/common.h"

struct event_base;
typedef struct aq_cancelwatch aq_cancelwatch;

/* cb(task_id, arg) runs on `base`'s loop for every cancel request seen.
 * dsn and worker_id are copied. Free with aq_cancelwatch_free(). */
aq_cancelwatch *aq_cancelwatch_new(const char *dsn, const char *worker_id, struct event_base *base,
                                   void (*cb)(const char *task_id, void *arg), void *arg,
                                   char *err, size_t errlen);
void aq_cancelwatch_free(aq_cancelwatch *w);

#endif
