/* migrate.h — applies the SQL migrations in sql/ to a PostgreSQL database
 * (what `agentqctl migrate` runs) and reports which are applied.
 *
 * A migration is a file NNN_name.sql (NNN: three or more digits, its
 * version) in the SQL directory. Files apply in ascending version order,
 * each in its own transaction together with the row recording it in
 * agentq.schema_migrations (version, name, checksum, applied_at), so a
 * failed file leaves nothing behind and a recorded one never runs again.
 * A file must therefore hold no transaction control of its own.
 * Concurrent migrators (several pods' init containers, a Job and a user)
 * serialise on a PostgreSQL advisory lock, so each file applies once.
 *
 * These calls block (libpq synchronous API): they belong in agentqctl and
 * set-up code, never on a worker's event loop. They do not own the SQL
 * files' contents nor the roles and grants those files create. */
#ifndef AGENTQ_MIGRATE_H
#define AGENTQ_MIGRATE_H

#include "agentq/common.h"

/* The SQL directory to use when none is given: $AGENTQ_SQL_DIR when set
 * and non-empty; else the source tree's sql/ when it exists (running from
 * a build tree); else the installed share/agentq/sql. Returns a borrowed
 * string (the environment's or a static one). */
const char *aq_migrate_default_dir(void);

/* Applies every migration in `sql_dir` (borrowed; NULL means
 * aq_migrate_default_dir()) not yet recorded in the database at `dsn`
 * (borrowed; a libpq connection string or URI). Stores in *applied
 * (may be NULL) how many files it applied, also when it fails part way:
 * those before the failing file stay applied.
 *
 * Returns 0; AQ_ENOTFOUND if the directory cannot be read or holds no
 * migration; AQ_EIO if the database cannot be reached or the connection
 * fails; AQ_EINVAL if a file is unreadable, two files share a version, or
 * PostgreSQL rejects a file — `err` then names the file and carries
 * PostgreSQL's message (with its LINE, counted in the file). */
AQ_MUSTCHECK int aq_migrate_apply(const char *dsn, const char *sql_dir,
                                  int *applied, char *err, size_t errlen);

/* One migration as aq_migrate_status() sees it. */
typedef struct aq_migration {
    char *version;    /* "001"; never NULL */
    char *file;       /* "001_schema.sql"; NULL if recorded but no such file */
    bool applied;     /* recorded in agentq.schema_migrations */
    char *applied_at; /* PostgreSQL's text of the timestamp, NULL if not applied */
    bool changed;     /* applied, and the file's content differs since */
} aq_migration;

/* Lists the union of the migrations in `sql_dir` (NULL: the default) and
 * those recorded in the database, in version order, into *out (caller
 * frees with aq_migrate_list_free(*out, *n)). A database never migrated
 * lists every file as not applied. Returns 0 or an AQ_E* code as
 * aq_migrate_apply() does; *out is NULL and *n 0 on failure. */
AQ_MUSTCHECK int aq_migrate_status(const char *dsn, const char *sql_dir,
                                   aq_migration **out, size_t *n,
                                   char *err, size_t errlen);

/* Frees a list from aq_migrate_status(); NULL is allowed. */
void aq_migrate_list_free(aq_migration *list, size_t n);

#endif
