/* agentqctl — operate agentq: schema migrations, queue and task status,
 * results, cancellation, requeueing dead letters.
 *
 * Wires config, migrate, broker (queue depths, requeue publishes) and a
 * plain blocking libpq connection: this is a command-line tool, not the
 * worker's loop. */
#include "agentq/broker.h"
#include "agentq/config.h"
#include "agentq/log.h"
#include "agentq/migrate.h"
#include "agentq/pgconn.h"
#include "agentq/task.h"

#include <getopt.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *out)
{
    fputs("Usage: agentqctl [-c FILE] COMMAND [ARGS]\n"
          "\n"
          "Commands:\n"
          "  migrate                 apply the SQL migrations not yet applied (safe to repeat)\n"
          "  migrate --status        list migrations and whether each is applied\n"
          "  status                  queue depths and task counts by status\n"
          "  result ID               one task's row and its steps, as JSON\n"
          "  cancel ID               ask for a task to stop (it ends as 'cancelled')\n"
          "  answer ID TEXT          answer the question of a task that is 'waiting' (ask_human);\n"
          "                          it resumes with TEXT as the answer (TEXT '-': read stdin)\n"
          "  requeue ID              send a task's dead letter back to the task queue\n"
          "  requeue --dead [--reason R] [--limit N]\n"
          "                          send every parked dead letter (of reason R) back;\n"
          "                          'duplicate' ones (refused twins of a task) only with --reason duplicate\n"
          "  top [--interval S]      status refreshed every S seconds (default 2) until Ctrl-C\n"
          "\n"
          "Options:\n"
          "  -c, --config FILE       configuration file\n"
          "  -h, --help              this help\n"
          "  -V, --version           version\n"
          "\n"
          "Exit status: 0 ok, 1 not found / nothing done, 2 usage or configuration error,\n"
          "3 broker or database error.\n\n",
          out);
    aq_config_print_env_help(out);
}

static PGconn *db(const aq_config *cfg) { return aq_pg_connect_cli(cfg->pg_dsn, "agentqctl"); }

static PGresult *q(PGconn *pg, const char *sql, int n, const char *const *params, ExecStatusType want)
{
    PGresult *r = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != want) {
        fprintf(stderr, "agentqctl: %s", PQresultErrorMessage(r));
        PQclear(r);
        return NULL;
    }
    return r;
}

static int cmd_migrate(const aq_config *cfg, int argc, char **argv)
{
    const char *dir = aq_migrate_default_dir();
    char err[2048];
    if (argc > 1 && !strcmp(argv[1], "--status")) {
        aq_migration *list;
        size_t n;
        if (aq_migrate_status(cfg->pg_dsn, dir, &list, &n, err, sizeof err) != AQ_OK) {
            fprintf(stderr, "agentqctl: %s\n", err);
            return 3;
        }
        for (size_t i = 0; i < n; i++)
            printf("%-5s %-28s %s%s\n", list[i].version, list[i].file ? list[i].file : "(file missing)",
                   list[i].applied ? list[i].applied_at : "not applied", list[i].changed ? "  (file changed since)" : "");
        aq_migrate_list_free(list, n);
        return 0;
    }
    int applied = 0;
    if (aq_migrate_apply(cfg->pg_dsn, dir, &applied, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: migrate: %s\n", err);
        return 3;
    }
    printf("migrate: %d migration%s applied from %s\n", applied, applied == 1 ? "" : "s", dir);
    return 0;
}

static int print_status(const aq_config *cfg, PGconn *pg)
{
    char err[512];
    aq_broker *b = aq_broker_connect(cfg->amqp_url, 0, 5000, err, sizeof err);
    printf("%-28s %10s %10s\n", "queue", "messages", "consumers");
    if (!b) {
        printf("  (broker unavailable: %s)\n", err);
    } else {
        const char *queues[] = {cfg->amqp_queue, cfg->amqp_dead_queue};
        for (int i = 0; i < 2; i++) {
            int64_t m = 0, c = 0;
            if (aq_broker_queue_depth(b, queues[i], &m, &c, err, sizeof err) == AQ_OK)
                printf("%-28s %10lld %10lld\n", queues[i], (long long)m, (long long)c);
            else
                printf("%-28s %s\n", queues[i], err);
        }
        /* The lanes as one line: their sum is the backlog waiting to run;
         * the busiest lane says whether one user's burst is behind it. */
        int64_t lanes_total = 0, lanes_max = 0, lanes_consumers = 0;
        int lanes_ok = 0;
        for (int i = 0; i < cfg->amqp_lanes; i++) {
            char name[256];
            int64_t m = 0, c = 0;
            aq_broker_lane_queue(cfg, i, name, sizeof name);
            if (aq_broker_queue_depth(b, name, &m, &c, err, sizeof err) != AQ_OK) continue;
            lanes_ok++;
            lanes_total += m;
            if (m > lanes_max) lanes_max = m;
            if (c > lanes_consumers) lanes_consumers = c;
        }
        char label[256];
        snprintf(label, sizeof label, "%s0..%d", cfg->amqp_lane_prefix, cfg->amqp_lanes - 1);
        if (lanes_ok)
            printf("%-28s %10lld %10lld   (busiest lane %lld)\n", label, (long long)lanes_total,
                   (long long)lanes_consumers, (long long)lanes_max);
        long delays[32];
        int n = aq_config_retry_delays(cfg, delays, 32);
        for (int i = 0; i < n; i++) {
            char name[256];
            int64_t m = 0;
            aq_broker_retry_queue(cfg, delays[i], name, sizeof name);
            if (aq_broker_queue_depth(b, name, &m, NULL, err, sizeof err) == AQ_OK)
                printf("%-28s %10lld\n", name, (long long)m);
        }
        aq_broker_free(b);
    }
    PGresult *r = q(pg,
                    "SELECT status, count(*), coalesce(sum(cost_usd),0)::numeric(14,6),"
                    " coalesce(sum(prompt_tokens+completion_tokens),0) FROM agentq.tasks GROUP BY status ORDER BY 2 DESC",
                    0, NULL, PGRES_TUPLES_OK);
    if (!r) return 3;
    printf("\n%-16s %10s %14s %14s\n", "status", "tasks", "cost_usd", "tokens");
    for (int i = 0; i < PQntuples(r); i++)
        printf("%-16s %10s %14s %14s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2),
               PQgetvalue(r, i, 3));
    PQclear(r);
    r = q(pg, "SELECT count(*) FROM agentq.dead_letters WHERE requeued_at IS NULL", 0, NULL, PGRES_TUPLES_OK);
    if (r) {
        printf("\nparked dead letters: %s\n", PQgetvalue(r, 0, 0));
        PQclear(r);
    }
    return 0;
}

static int cmd_result(PGconn *pg, const char *id)
{
    const char *p[] = {id};
    PGresult *r = q(pg,
                    "SELECT json_build_object('task', to_jsonb(t), 'steps', coalesce((SELECT jsonb_agg(to_jsonb(s) ORDER BY"
                    " s.attempt, s.step, s.id) FROM agentq.steps s WHERE s.task_id = t.task_id), '[]'::jsonb))"
                    " FROM agentq.tasks t WHERE t.task_id = $1::uuid",
                    1, p, PGRES_TUPLES_OK);
    if (!r) return 3;
    int found = PQntuples(r) > 0;
    if (found) puts(PQgetvalue(r, 0, 0));
    else fprintf(stderr, "agentqctl: no task %s\n", id);
    PQclear(r);
    return found ? 0 : 1;
}

static int cmd_cancel(PGconn *pg, const char *id)
{
    const char *p[] = {id};
    PGresult *r = q(pg,
                    "UPDATE agentq.tasks SET cancel_requested = true WHERE task_id = $1::uuid"
                    " RETURNING status, agentq.is_final(status)",
                    1, p, PGRES_TUPLES_OK);
    if (!r) return 3;
    int rc = 0;
    if (PQntuples(r) == 0) {
        fprintf(stderr, "agentqctl: no task %s (a task gets a row when a worker first takes it, or with agentq-producer --record)\n", id);
        rc = 1;
    } else if (!strcmp(PQgetvalue(r, 0, 1), "t")) {
        printf("task %s is already %s\n", id, PQgetvalue(r, 0, 0));
    } else {
        /* A trigger NOTIFYs agentq_cancel; the worker running it stops it. */
        printf("cancel requested for task %s (now %s)\n", id, PQgetvalue(r, 0, 0));
    }
    PQclear(r);
    return rc;
}

/* agentq.answer (sql/014_sessions.sql) says what is wrong: not waiting,
 * answered already, no such task. */
static int cmd_answer(PGconn *pg, const char *id, const char *text)
{
    char *owned = NULL;
    if (!strcmp(text, "-")) { /* a long answer, or one with quotes, from stdin */
        size_t len = 0;
        FILE *m = open_memstream(&owned, &len);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, n, m);
        fclose(m);
        while (len && (owned[len - 1] == '\n' || owned[len - 1] == '\r')) owned[--len] = '\0';
        text = owned;
    }
    const char *p[] = {id, text};
    PGresult *r = PQexecParams(pg, "SELECT agentq.answer($1::uuid, $2::text)", 2, NULL, p, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
        printf("task %s answered; it resumes with the answer (now %s)\n", id, PQgetvalue(r, 0, 0));
    } else {
        const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
        const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
        fprintf(stderr, "agentqctl: %s\n", msg ? msg : PQresultErrorMessage(r));
        /* no such task, or not waiting: nothing done; anything else is the database's */
        rc = state && (!strcmp(state, "P0002") || !strcmp(state, "55000")) ? 1 : 3;
    }
    PQclear(r);
    free(owned);
    return rc;
}

/* Marks dead letters requeued and their tasks queued with fresh failure
 * and interruption counts (or, with on = false, parks them again with the
 * status the dead letter gave). A task row changes only for a dead letter
 * of the body that defined it: requeueing a twin that was refused never
 * reopens the task it collided with. The attempt number goes on, so the
 * new run's steps do not collide with the old ones. One transaction.
 * Returns 0 or 3. */
static int mark_requeued(PGconn *pg, char **ids, int n, bool on)
{
    PQclear(PQexec(pg, "BEGIN"));
    for (int i = 0; i < n; i++) {
        const char *p[] = {ids[i]};
        PGresult *r = q(pg,
                        on ? "WITH d AS (UPDATE agentq.dead_letters SET requeued_at = now() WHERE id = $1::bigint"
                             " RETURNING task_id, body)"
                             " UPDATE agentq.tasks t SET status = 'queued', failures = 0, interruptions = 0,"
                             " error = NULL, finished_at = NULL, cancel_requested = false, deadline = NULL"
                             " FROM d WHERE t.task_id = d.task_id"
                             " AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256(d.body))"
                           : "WITH d AS (UPDATE agentq.dead_letters SET requeued_at = NULL WHERE id = $1::bigint"
                             " RETURNING task_id, reason, error, body)"
                             " UPDATE agentq.tasks t SET status = CASE d.reason WHEN 'expired' THEN 'expired'"
                             " WHEN 'rejected' THEN 'rejected' ELSE 'failed' END, error = d.error, finished_at = now()"
                             " FROM d WHERE t.task_id = d.task_id AND t.status = 'queued'"
                             " AND (t.body_sha256 IS NULL OR t.body_sha256 = sha256(d.body))",
                        1, p, PGRES_COMMAND_OK);
        if (!r) {
            PQclear(PQexec(pg, "ROLLBACK"));
            return 3;
        }
        PQclear(r);
    }
    PGresult *r = q(pg, "COMMIT", 0, NULL, PGRES_COMMAND_OK);
    if (!r) return 3;
    PQclear(r);
    return 0;
}

/* Publishes each dead letter selected by `where` back to the task queue
 * with a fresh attempt count, then marks it requeued. */
static int requeue(const aq_config *cfg, PGconn *pg, const char *where, int n, const char *const *params)
{
    char sql[1024], err[512];
    snprintf(sql, sizeof sql,
             "SELECT id, body, coalesce(task_id::text, ''), (SELECT priority FROM agentq.tasks t WHERE t.task_id = d.task_id)"
             " FROM agentq.dead_letters d WHERE requeued_at IS NULL AND %s ORDER BY id",
             where);
    PGresult *r = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 1); /* binary: body is bytea */
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "agentqctl: %s", PQresultErrorMessage(r));
        PQclear(r);
        return 3;
    }
    int rows = PQntuples(r);
    if (rows == 0) {
        fprintf(stderr, "agentqctl: nothing to requeue\n");
        PQclear(r);
        return 1;
    }
    aq_broker *b = aq_broker_connect(cfg->amqp_url, 0, 10000, err, sizeof err);
    if (!b || aq_broker_declare(b, cfg, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: %s\n", err);
        aq_broker_free(b);
        PQclear(r);
        return 3;
    }
    /* The rows say queued (attempt 1) before the messages exist: a worker
     * that takes one at once must not find the old final status and ack it
     * unrun. If the broker does not confirm, the rows are put back. */
    char **ids = aq_xcalloc((size_t)rows, sizeof *ids);
    for (int i = 0; i < rows; i++) {
        const unsigned char *v = (const unsigned char *)PQgetvalue(r, i, 0);
        long long id = 0;
        for (int k = 0; k < 8; k++) id = (id << 8) | v[k];
        ids[i] = aq_xmalloc(32);
        snprintf(ids[i], 32, "%lld", id);
    }
    int rc = mark_requeued(pg, ids, rows, true);
    for (int i = 0; rc == 0 && i < rows; i++) {
        const char *tid = PQgetvalue(r, i, 2);
        int prio = 0;
        if (!PQgetisnull(r, i, 3)) {
            const unsigned char *v = (const unsigned char *)PQgetvalue(r, i, 3);
            prio = (v[0] << 8) | v[1]; /* smallint, network order */
        }
        aq_publish p = {cfg->amqp_exchange, "task", PQgetvalue(r, i, 1), (size_t)PQgetlength(r, i, 1),
                        *tid ? tid : NULL, prio, NULL, 0, NULL};
        if (aq_broker_publish(b, &p, NULL, err, sizeof err) < 0) {
            fprintf(stderr, "agentqctl: %s\n", err);
            rc = 3;
        }
    }
    int64_t nacked = 0;
    if (rc == 0 && aq_broker_wait_confirms(b, 30000, &nacked, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: %s\n", err);
        rc = 3;
    }
    aq_broker_free(b);
    if (rc != 0) {
        fprintf(stderr, "agentqctl: not confirmed by the broker; the dead letters stay parked\n");
        (void)mark_requeued(pg, ids, rows, false);
    }
    for (int i = 0; i < rows; i++) free(ids[i]);
    free(ids);
    if (rc != 0) {
        PQclear(r);
        return rc;
    }
    printf("requeued %d dead letter%s\n", rows, rows == 1 ? "" : "s");
    PQclear(r);
    return 0;
}

int main(int argc, char **argv)
{
    const char *config_path = NULL;
    static const struct option longopts[] = {{"config", required_argument, 0, 'c'},
                                             {"help", no_argument, 0, 'h'},
                                             {"version", no_argument, 0, 'V'},
                                             {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "+c:hV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c': config_path = optarg; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("agentqctl %s\n", AGENTQ_VERSION); return 0;
        default: fprintf(stderr, "Try 'agentqctl --help'.\n"); return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    aq_config cfg;
    char err[1024];
    if (aq_config_load(&cfg, config_path, err, sizeof err) != AQ_OK) {
        fprintf(stderr, "agentqctl: %s\n", err);
        aq_config_free(&cfg);
        return 2;
    }
    aq_log_set_level((aq_log_level)aq_log_level_parse(cfg.log_level));
    int sargc = argc - optind;
    char **sargv = argv + optind;
    const char *cmd = sargv[0];
    int rc = 2;
    PGconn *pg = NULL;
    if (!strcmp(cmd, "migrate")) {
        rc = cmd_migrate(&cfg, sargc, sargv);
    } else if (!strcmp(cmd, "status") || !strcmp(cmd, "top")) {
        if (!(pg = db(&cfg))) {
            rc = 3;
        } else if (!strcmp(cmd, "status")) {
            rc = print_status(&cfg, pg);
        } else {
            double every = (sargc > 2 && !strcmp(sargv[1], "--interval")) ? atof(sargv[2]) : 2.0;
            if (every <= 0) every = 2.0;
            for (;;) {
                printf("\033[H\033[2J");
                if ((rc = print_status(&cfg, pg)) != 0) break;
                fflush(stdout);
                usleep((useconds_t)(every * 1e6));
            }
        }
    } else if (!strcmp(cmd, "answer")) {
        if (sargc != 3) {
            fprintf(stderr, "agentqctl: answer needs a task id and the answer: agentqctl answer ID TEXT\n");
        } else if (!aq_task_uuid_valid(sargv[1])) {
            fprintf(stderr, "agentqctl: '%s' is not a task id (a UUID like 6f1c...-...)\n", sargv[1]);
        } else if (!(pg = db(&cfg))) {
            rc = 3;
        } else {
            rc = cmd_answer(pg, sargv[1], sargv[2]);
        }
    } else if (!strcmp(cmd, "result") || !strcmp(cmd, "cancel") || !strcmp(cmd, "requeue")) {
        bool dead = sargc > 1 && !strcmp(sargv[1], "--dead");
        if (sargc < 2) {
            fprintf(stderr, "agentqctl: %s needs a task id%s\n", cmd, strcmp(cmd, "requeue") ? "" : " or --dead");
        } else if (!dead && !aq_task_uuid_valid(sargv[1])) {
            fprintf(stderr, "agentqctl: '%s' is not a task id (a UUID like 6f1c...-...)\n", sargv[1]);
        } else if (!(pg = db(&cfg))) {
            rc = 3;
        } else if (!strcmp(cmd, "result")) {
            rc = cmd_result(pg, sargv[1]);
        } else if (!strcmp(cmd, "cancel")) {
            rc = cmd_cancel(pg, sargv[1]);
        } else if (!dead) {
            const char *p[] = {sargv[1]};
            /* Not the duplicates: they are refused twins, not the task. */
            rc = requeue(&cfg, pg, "task_id = $1::uuid AND reason <> 'duplicate'", 1, p);
        } else {
            const char *reason = NULL, *limit = "1000000";
            for (int i = 2; i + 1 < sargc; i += 2) {
                if (!strcmp(sargv[i], "--reason")) reason = sargv[i + 1];
                else if (!strcmp(sargv[i], "--limit")) limit = sargv[i + 1];
            }
            const char *p[] = {reason ? reason : "", limit};
            /* Duplicates only when asked for by name. */
            rc = requeue(&cfg, pg,
                         "id IN (SELECT id FROM agentq.dead_letters WHERE requeued_at IS NULL"
                         " AND (($1 = '' AND reason <> 'duplicate') OR reason = $1) ORDER BY id LIMIT $2::bigint)",
                         2, p);
        }
    } else {
        fprintf(stderr, "agentqctl: unknown command '%s'. Try --help.\n", cmd);
    }
    if (pg) PQfinish(pg);
    aq_config_free(&cfg);
    return rc;
}
