/* migrate.c — the SQL migrator behind `agentqctl migrate` (see migrate.h).
 *
 * Owns: finding NNN_*.sql files, the agentq.schema_migrations table and the
 * advisory lock that serialises migrators. Does not own the schema itself
 * (the files in sql/) nor any long-lived connection: each call connects,
 * works and disconnects, since it runs once per deployment, not per task.
 *
 * It leaves nothing in the session between transactions (no session SET,
 * no session lock), so it works through a pooler in transaction mode as
 * well as against Postgres itself: every step is a transaction that takes
 * the migration lock for itself (pg_advisory_xact_lock), and a file is
 * applied only if, under that lock, it is still not recorded. */
#include "agentq/migrate.h"
#include "agentq/log.h"
#include "agentq/pgconn.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <libpq-fe.h>

/* 'agtq' 'migr': any constant works as long as every migrator uses it and
 * nothing else in the database takes the same advisory key. */
#define AQ_MIGRATE_LOCK_KEY "7018111557297424754"
/* Far above any migration; a bigger file is a mistake, not a schema. */
#define AQ_MIGRATE_MAX_FILE (16u * 1024u * 1024u)

static const char *const bootstrap_sql =
    "CREATE SCHEMA IF NOT EXISTS agentq;"
    "CREATE TABLE IF NOT EXISTS agentq.schema_migrations ("
    "  version    text PRIMARY KEY,"
    "  name       text NOT NULL,"
    "  checksum   text NOT NULL,"
    "  applied_at timestamptz NOT NULL DEFAULT now())";

typedef struct mfile {
    char *version; /* the digits of the name */
    char *name;    /* file name, no directory */
} mfile;

const char *aq_migrate_default_dir(void)
{
    const char *env = getenv("AGENTQ_SQL_DIR");
    if (env && *env)
        return env;
    struct stat st;
    if (stat(AGENTQ_SOURCE_SQL_DIR, &st) == 0 && S_ISDIR(st.st_mode))
        return AGENTQ_SOURCE_SQL_DIR;
    return AGENTQ_SQL_DIR;
}

/* Copies PostgreSQL's message without its trailing newline(s). */
static void set_pg_err(char *err, size_t errlen, const char *prefix, const char *msg)
{
    if (!msg || !*msg)
        msg = "unknown error";
    size_t len = strlen(msg);
    while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' '))
        len--;
    aq_seterr(err, errlen, "%s%.*s", prefix, (int)len, msg);
}

/* Returns a connection (caller frees with PQfinish) or NULL with err set. */
static PGconn *connect_db(const char *dsn, char *err, size_t errlen)
{
    char why[512];
    aq_pg_connect_opts o = {.application_name = "agentq-migrate"};
    PGconn *conn = aq_pg_connect(dsn, &o, why, sizeof why);
    if (!conn) aq_seterr(err, errlen, "cannot connect to PostgreSQL: %s", why);
    return conn;
}

/* Runs a command that returns no rows; on failure sets err (prefixed) and
 * returns AQ_EIO for a lost connection, else AQ_EINVAL. */
static int exec_cmd(PGconn *conn, const char *sql, const char *prefix, char *err, size_t errlen)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
        PQclear(res);
        return AQ_OK;
    }
    set_pg_err(err, errlen, prefix,
               res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
    PQclear(res);
    return PQstatus(conn) == CONNECTION_BAD ? AQ_EIO : AQ_EINVAL;
}

/* "NNN_anything.sql", NNN at least three digits: returns the digit count,
 * 0 if `name` is not a migration. */
static size_t migration_digits(const char *name)
{
    size_t d = 0;
    while (name[d] >= '0' && name[d] <= '9')
        d++;
    size_t len = strlen(name);
    if (d < 3 || name[d] != '_' || len < d + 1 + 4 || strcmp(name + len - 4, ".sql") != 0)
        return 0;
    return d;
}

/* Numeric order of two digit strings of any length. */
static int version_cmp(const char *a, const char *b)
{
    while (*a == '0' && a[1])
        a++;
    while (*b == '0' && b[1])
        b++;
    size_t la = strlen(a), lb = strlen(b);
    if (la != lb)
        return la < lb ? -1 : 1;
    return strcmp(a, b);
}

static int mfile_cmp(const void *pa, const void *pb)
{
    const mfile *a = pa, *b = pb;
    int c = version_cmp(a->version, b->version);
    return c ? c : strcmp(a->name, b->name);
}

static void mfiles_free(mfile *files, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(files[i].version);
        free(files[i].name);
    }
    free(files);
}

/* Lists the migrations in `dir`, sorted by version, into *out (caller
 * frees with mfiles_free). */
static int scan_dir(const char *dir, mfile **out, size_t *nout, char *err, size_t errlen)
{
    *out = NULL;
    *nout = 0;
    DIR *d = opendir(dir);
    if (!d) {
        aq_seterr(err, errlen, "cannot read SQL directory %s: %s", dir, strerror(errno));
        return AQ_ENOTFOUND;
    }
    mfile *files = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t digits = migration_digits(de->d_name);
        if (!digits)
            continue;
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            files = aq_xrealloc(files, cap * sizeof *files);
        }
        files[n].version = aq_xstrndup(de->d_name, digits);
        files[n].name = aq_xstrdup(de->d_name);
        n++;
    }
    closedir(d);
    if (n == 0) {
        free(files);
        aq_seterr(err, errlen, "no migrations (NNN_name.sql) in %s", dir);
        return AQ_ENOTFOUND;
    }
    qsort(files, n, sizeof *files, mfile_cmp);
    for (size_t i = 1; i < n; i++) {
        if (version_cmp(files[i - 1].version, files[i].version) == 0) {
            aq_seterr(err, errlen, "%s and %s in %s share version %s", files[i - 1].name,
                      files[i].name, dir, files[i].version);
            mfiles_free(files, n);
            return AQ_EINVAL;
        }
    }
    *out = files;
    *nout = n;
    return AQ_OK;
}

/* Reads a whole migration into a NUL-terminated string (caller frees). */
static int read_sql(const char *dir, const char *name, char **out, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        aq_seterr(err, errlen, "%s: %s", path, strerror(errno));
        return AQ_EINVAL;
    }
    size_t cap = 8192, len = 0;
    char *buf = aq_xmalloc(cap);
    for (;;) {
        if (cap - len < 4096) {
            cap *= 2;
            buf = aq_xrealloc(buf, cap);
        }
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (len > AQ_MIGRATE_MAX_FILE) {
            aq_seterr(err, errlen, "%s: larger than %u bytes", path, AQ_MIGRATE_MAX_FILE);
            goto fail;
        }
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        aq_seterr(err, errlen, "%s: read error", path);
        goto fail;
    }
    buf[len] = '\0';
    if (strlen(buf) != len) {
        /* PQexec takes a C string: a NUL would silently cut the file. */
        aq_seterr(err, errlen, "%s: contains a NUL byte", path);
        goto fail;
    }
    fclose(f);
    *out = buf;
    return AQ_OK;
fail:
    fclose(f);
    free(buf);
    return AQ_EINVAL;
}

/* True if `version` is among the first column of `recorded`. */
static bool is_recorded(const PGresult *recorded, const char *version)
{
    for (int i = 0; i < PQntuples(recorded); i++)
        if (strcmp(PQgetvalue(recorded, i, 0), version) == 0)
            return true;
    return false;
}

/* BEGIN, notices below warnings left out for this transaction only, and
 * the migration lock until its end: a second migrator waits here, then
 * sees what the first recorded. */
static int begin_locked(PGconn *conn, const char *prefix, char *err, size_t errlen)
{
    int rc = exec_cmd(conn, "BEGIN", prefix, err, errlen);
    if (rc == AQ_OK)
        rc = exec_cmd(conn, "SET LOCAL client_min_messages = warning", prefix, err, errlen);
    if (rc == AQ_OK)
        rc = exec_cmd(conn, "SELECT pg_advisory_xact_lock(" AQ_MIGRATE_LOCK_KEY ")",
                      "cannot take the migration lock: ", err, errlen);
    return rc;
}

/* Ends a transaction that failed (nothing of it stays). */
static void rollback_failed(PGconn *conn)
{
    if (PQstatus(conn) != CONNECTION_OK || PQtransactionStatus(conn) == PQTRANS_IDLE)
        return;
    char ignored[16];
    (void)exec_cmd(conn, "ROLLBACK", "", ignored, sizeof ignored);
}

/* Whether another migrator recorded `version` meanwhile (under the lock). */
static int recorded_now(PGconn *conn, const char *version, bool *yes, const char *prefix, char *err,
                        size_t errlen)
{
    const char *params[] = {version};
    PGresult *res = PQexecParams(conn, "SELECT 1 FROM agentq.schema_migrations WHERE version = $1", 1, NULL,
                                 params, NULL, NULL, 0);
    int rc = AQ_OK;
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        *yes = PQntuples(res) > 0;
    } else {
        set_pg_err(err, errlen, prefix, res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        rc = PQstatus(conn) == CONNECTION_BAD ? AQ_EIO : AQ_EINVAL;
    }
    PQclear(res);
    return rc;
}

/* Applies one file in one transaction with its record row, unless another
 * migrator has recorded it by the time this one holds the lock (*did
 * says which). */
static int apply_one(PGconn *conn, const char *dir, const mfile *m, bool *did, char *err, size_t errlen)
{
    *did = false;
    char *sql = NULL;
    int rc = read_sql(dir, m->name, &sql, err, errlen);
    if (rc != AQ_OK)
        return rc;

    char prefix[512];
    snprintf(prefix, sizeof prefix, "%s: ", m->name);
    bool done = false;
    rc = begin_locked(conn, prefix, err, errlen);
    if (rc == AQ_OK)
        rc = recorded_now(conn, m->version, &done, prefix, err, errlen);
    if (rc == AQ_OK && done) {
        rc = exec_cmd(conn, "ROLLBACK", prefix, err, errlen);
        free(sql);
        return rc;
    }
    if (rc == AQ_OK)
        rc = exec_cmd(conn, sql, prefix, err, errlen);
    if (rc == AQ_OK) {
        const char *params[] = {m->version, m->name, sql};
        PGresult *res = PQexecParams(conn,
                                     "INSERT INTO agentq.schema_migrations"
                                     " (version, name, checksum) VALUES ($1, $2, md5($3))",
                                     3, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            set_pg_err(err, errlen, prefix,
                       res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
            rc = PQstatus(conn) == CONNECTION_BAD ? AQ_EIO : AQ_EINVAL;
        }
        PQclear(res);
    }
    if (rc == AQ_OK)
        rc = exec_cmd(conn, "COMMIT", prefix, err, errlen);
    if (rc != AQ_OK)
        rollback_failed(conn);
    free(sql);
    if (rc == AQ_OK) {
        *did = true;
        aq_log(AQ_LOG_INFO, "applied migration %s", m->name);
    }
    return rc;
}

/* What both verbs start from: the directory's files and a connection. On
 * failure nothing is left to free. */
static int open_migrations(const char *dsn, const char *sql_dir, mfile **files, size_t *n, PGconn **conn,
                           char *err, size_t errlen)
{
    int rc = scan_dir(sql_dir, files, n, err, errlen);
    if (rc != AQ_OK) return rc;
    *conn = connect_db(dsn, err, errlen);
    if (!*conn) {
        mfiles_free(*files, *n);
        return AQ_EIO;
    }
    return AQ_OK;
}

int aq_migrate_apply(const char *dsn, const char *sql_dir, int *applied, char *err, size_t errlen)
{
    if (applied)
        *applied = 0;
    if (!sql_dir)
        sql_dir = aq_migrate_default_dir();
    mfile *files;
    size_t n;
    PGconn *conn;
    int rc = open_migrations(dsn, sql_dir, &files, &n, &conn, err, errlen);
    if (rc != AQ_OK)
        return rc;

    PGresult *recorded = NULL;
    rc = begin_locked(conn, "", err, errlen);
    if (rc == AQ_OK)
        rc = exec_cmd(conn, bootstrap_sql, "cannot create agentq.schema_migrations: ", err,
                      errlen);
    if (rc == AQ_OK)
        rc = exec_cmd(conn, "COMMIT", "cannot create agentq.schema_migrations: ", err, errlen);
    if (rc != AQ_OK)
        rollback_failed(conn);
    /* Those recorded already are skipped without a lock; the rest are
     * looked at again under it (apply_one). */
    if (rc == AQ_OK) {
        recorded = PQexec(conn, "SELECT version FROM agentq.schema_migrations");
        if (PQresultStatus(recorded) != PGRES_TUPLES_OK) {
            set_pg_err(err, errlen, "cannot read agentq.schema_migrations: ",
                       recorded ? PQresultErrorMessage(recorded) : PQerrorMessage(conn));
            rc = PQstatus(conn) == CONNECTION_BAD ? AQ_EIO : AQ_EINVAL;
        }
    }
    for (size_t i = 0; rc == AQ_OK && i < n; i++) {
        if (is_recorded(recorded, files[i].version))
            continue;
        bool did = false;
        rc = apply_one(conn, sql_dir, &files[i], &did, err, errlen);
        if (rc == AQ_OK && did && applied)
            (*applied)++;
    }
    PQclear(recorded);
    PQfinish(conn);
    mfiles_free(files, n);
    return rc;
}

void aq_migrate_list_free(aq_migration *list, size_t n)
{
    if (!list)
        return;
    for (size_t i = 0; i < n; i++) {
        free(list[i].version);
        free(list[i].file);
        free(list[i].applied_at);
    }
    free(list);
}

static int migration_cmp(const void *pa, const void *pb)
{
    const aq_migration *a = pa, *b = pb;
    return version_cmp(a->version, b->version);
}

/* Whether `file`'s content still has the checksum recorded for it. */
static int file_changed(PGconn *conn, const char *dir, const char *file, const char *checksum,
                        bool *changed, char *err, size_t errlen)
{
    char *sql = NULL;
    int rc = read_sql(dir, file, &sql, err, errlen);
    if (rc != AQ_OK)
        return rc;
    const char *params[] = {sql};
    PGresult *res = PQexecParams(conn, "SELECT md5($1)", 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        set_pg_err(err, errlen, "", res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        rc = AQ_EIO;
    } else {
        *changed = strcmp(PQgetvalue(res, 0, 0), checksum) != 0;
    }
    PQclear(res);
    free(sql);
    return rc;
}

int aq_migrate_status(const char *dsn, const char *sql_dir, aq_migration **out, size_t *nout,
                      char *err, size_t errlen)
{
    *out = NULL;
    *nout = 0;
    if (!sql_dir)
        sql_dir = aq_migrate_default_dir();
    mfile *files;
    size_t nfiles;
    PGconn *conn;
    int rc = open_migrations(dsn, sql_dir, &files, &nfiles, &conn, err, errlen);
    if (rc != AQ_OK)
        return rc;

    /* A database never migrated has no table: every file is pending. */
    PGresult *rec = NULL;
    PGresult *res = PQexec(conn, "SELECT to_regclass('agentq.schema_migrations') IS NOT NULL");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
        PQclear(res);
        res = rec = PQexec(conn, "SELECT version, name, checksum, applied_at::text"
                                 "  FROM agentq.schema_migrations");
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        set_pg_err(err, errlen, "cannot read agentq.schema_migrations: ",
                   res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        PQclear(res);
        PQfinish(conn);
        mfiles_free(files, nfiles);
        return AQ_EIO;
    }
    if (res != rec)
        PQclear(res);

    size_t nrec = rec ? (size_t)PQntuples(rec) : 0;
    aq_migration *list = aq_xcalloc(nfiles + nrec + 1, sizeof *list);
    size_t n = 0;
    for (size_t i = 0; i < nfiles; i++) {
        aq_migration *m = &list[n++];
        m->version = aq_xstrdup(files[i].version);
        m->file = aq_xstrdup(files[i].name);
        for (size_t r = 0; r < nrec; r++) {
            if (strcmp(PQgetvalue(rec, (int)r, 0), m->version) != 0)
                continue;
            m->applied = true;
            m->applied_at = aq_xstrdup(PQgetvalue(rec, (int)r, 3));
            rc = file_changed(conn, sql_dir, m->file, PQgetvalue(rec, (int)r, 2), &m->changed,
                              err, errlen);
            break;
        }
        if (rc != AQ_OK)
            break;
    }
    /* Recorded versions this tree no longer has (a newer schema, or a
     * renamed file) are listed too: the database is ahead of the files. */
    for (size_t r = 0; rc == AQ_OK && r < nrec; r++) {
        const char *v = PQgetvalue(rec, (int)r, 0);
        bool known = false;
        for (size_t i = 0; i < nfiles && !known; i++)
            known = strcmp(files[i].version, v) == 0;
        if (known)
            continue;
        aq_migration *m = &list[n++];
        m->version = aq_xstrdup(v);
        m->applied = true;
        m->applied_at = aq_xstrdup(PQgetvalue(rec, (int)r, 3));
    }
    PQclear(rec);
    PQfinish(conn);
    mfiles_free(files, nfiles);
    if (rc != AQ_OK) {
        aq_migrate_list_free(list, n);
        return rc;
    }
    qsort(list, n, sizeof *list, migration_cmp);
    *out = list;
    *nout = n;
    return AQ_OK;
}
