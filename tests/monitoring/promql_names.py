#!/usr/bin/env python3
"""promql_names.py -- checks k8s/monitoring against a worker's /metrics.

    promql_names.py --metrics METRICS.txt DASHBOARD.json ALERTS.yaml
    promql_names.py --list DASHBOARD.json ALERTS.yaml      (names only)
    promql_names.py --selftest

Reads every PromQL expression of a Grafana dashboard (each panel's
targets[].expr, rows' nested panels included, and the templating queries,
label_values(METRIC, LABEL) among them) and of a Prometheus rule file
(groups[].rules[].expr), and extracts the metric names and label names they
use. Then, against the Prometheus text exposition in METRICS.txt (what a
live worker served on /metrics):

  * every metric name must be a sample name there (a histogram is used as
    NAME_bucket / NAME_sum / NAME_count, which is what it serves);
  * every label in a selector NAME{label=...} must be a label of one of
    NAME's series there;
  * every label of a by / without / on / ignoring / group_left /
    group_right clause must be a label of some metric the same expression
    uses;

except the labels Prometheus attaches to a scraped target (job, instance,
namespace, pod, container, endpoint, service, node).

Exit status: 0 all found, 1 some are missing (printed, with where they are
used), 2 a file does not parse (JSON or YAML) or holds no expression.
"""
import argparse
import json
import re
import sys

TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service", "node"}
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
    # aggregation operators (may be written `sum by (x) (...)`)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
GRAFANA_VARS = re.compile(r"\$\{?__(?:rate_interval|interval|range|interval_ms|range_s|range_ms)\}?")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")


class Usage:
    """What one expression uses."""

    def __init__(self, where, expr):
        self.where = where
        self.expr = expr
        self.metrics = set()          # metric names
        self.selector_labels = {}     # metric -> set of label names in its {...}
        self.clause_labels = set()    # labels of by/without/on/ignoring/group_*


def parse_expr(where, expr):
    """Metric and label names of one PromQL expression."""
    u = Usage(where, expr)
    s = GRAFANA_VARS.sub("5m", expr)
    s = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", "x", s)  # other Grafana variables
    s = re.sub(r"#[^\n]*", "", s)                                      # PromQL comments
    s = STRING.sub('""', s)
    s = re.sub(r"\[[^\]]*\]", "", s)                                   # ranges, subqueries
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", "", s)
    # Selectors: NAME{...} and bare {...} (with __name__).
    def selector(m):
        name, body = m.group(1), m.group(2)
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
        if not name:
            nm = re.search(r'__name__\s*=\s*""', body)
            if nm:
                raise ValueError(f"{where}: {{__name__=...}} selectors are not supported: {expr}")
            return " "
        if name not in KEYWORDS:
            u.metrics.add(name)
            u.selector_labels.setdefault(name, set()).update(labels - {"__name__"})
        return " " + name + "_SEL_ "
    s = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}", selector, s)
    for m in CLAUSE.finditer(s):
        u.clause_labels.update(IDENT.findall(m.group(2)))
    s = CLAUSE.sub(" ", s)
    for m in IDENT.finditer(s):
        tok = m.group(0)
        if tok.endswith("_SEL_"):
            continue
        rest = s[m.end():].lstrip()
        if rest.startswith("("):        # a function call (or an aggregation)
            continue
        if tok in KEYWORDS or re.fullmatch(r"[0-9.eE+-]+|0x[0-9a-fA-F]+", tok):
            continue
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue                    # the exponent of a number: 1e3
        u.metrics.add(tok)
    return u


def dashboard_exprs(path):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    out = []

    def panels(ps, trail):
        for p in ps or []:
            title = p.get("title") or f"panel {p.get('id')}"
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((f"{path}: panel '{title}' {t.get('refId', '')}".rstrip(), t["expr"]))
            panels(p.get("panels"), trail + [title])

    panels(d.get("panels"), [])
    for v in (d.get("templating") or {}).get("list") or []:
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") != "query" or not isinstance(q, str) or not q.strip():
            continue
        where = f"{path}: variable ${v.get('name')}"
        m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
        if m:
            # label_values(SELECTOR, LABEL): LABEL must be on SELECTOR's series
            out.append((where, f"group by ({m.group(2)}) ({m.group(1)})"))
        elif re.fullmatch(r"\s*label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", q):
            continue
        elif re.fullmatch(r"\s*(metrics|label_names)\(.*\)\s*", q):
            continue
        else:
            m = re.fullmatch(r"\s*query_result\((.*)\)\s*", q, re.S)
            out.append((where, m.group(1) if m else q))
    return out


def rule_exprs(path):
    import yaml  # python3-yaml
    with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f)
    out = []
    for g in (d or {}).get("groups") or []:
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record") or "?"
            if r.get("expr") is not None:
                out.append((f"{path}: {g.get('name')}/{name}", str(r["expr"])))
    return out


def parse_exposition(text):
    """sample name -> set of label names, from Prometheus text format."""
    series = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*?)\})?\s", line + " ")
        if not m:
            continue
        labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"', m.group(3) or ""))
        series.setdefault(m.group(1), set()).update(labels)
    return series


def check(usages, series):
    missing = {}      # metric -> [where]
    bad_labels = []   # (where, text)
    for u in usages:
        for name in sorted(u.metrics):
            if name not in series:
                missing.setdefault(name, []).append(u.where)
        for name, labels in sorted(u.selector_labels.items()):
            if name not in series:
                continue
            for lab in sorted(labels - series[name] - TARGET_LABELS):
                bad_labels.append((u.where, f"label '{lab}' is on no series of {name}"))
        have = set(TARGET_LABELS)
        for name in u.metrics:
            have |= series.get(name, set())
        if all(n in series for n in u.metrics):
            for lab in sorted(u.clause_labels - have):
                bad_labels.append((u.where, f"label '{lab}' (by/on/without) is on no series of "
                                            f"{', '.join(sorted(u.metrics))}"))
    return missing, bad_labels


def selftest():
    cases = [
        ('sum by (status) (rate(agentq_tasks_finished_total{namespace=~"$namespace"}[$__rate_interval]))',
         {"agentq_tasks_finished_total"}, {"status"}),
        ('histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[5m]))) > 60', {"x_seconds_bucket"}, {"le"}),
        ('absent(agentq_build_info)', {"agentq_build_info"}, set()),
        ('sum(a{code="429"}) / on (provider) group_left sum(b) * 3600', {"a", "b"}, {"provider"}),
        ('max by (namespace, pod) (agentq_store_pending) > 1e3 and up == 1', {"agentq_store_pending", "up"},
         {"namespace", "pod"}),
        ('rate(m_total[5m] offset 1h) + count without (x) (n)', {"m_total", "n"}, {"x"}),
        ('sum(rate(a[1m])) by (provider)', {"a"}, {"provider"}),
    ]
    bad = 0
    for expr, metrics, labels in cases:
        u = parse_expr("selftest", expr)
        if u.metrics != metrics or u.clause_labels != labels:
            print(f"selftest FAIL: {expr}\n  metrics {sorted(u.metrics)} want {sorted(metrics)}\n"
                  f"  labels {sorted(u.clause_labels)} want {sorted(labels)}", file=sys.stderr)
            bad += 1
    series = parse_exposition('a_total{provider="x",code="200"} 1\n# TYPE h histogram\nh_bucket{le="1"} 0\n')
    if series != {"a_total": {"provider", "code"}, "h_bucket": {"le"}}:
        print(f"selftest FAIL: exposition {series}", file=sys.stderr)
        bad += 1
    u = parse_expr("selftest", 'sum by (provider) (a_total{code="429", model="m"})')
    missing, labels = check([u], series)
    if missing or labels != [("selftest", "label 'model' is on no series of a_total")]:
        print(f"selftest FAIL: check {missing} {labels}", file=sys.stderr)
        bad += 1
    print(f"promql_names selftest: {len(cases) + 2 - bad} passed, {bad} failed")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", help="a /metrics text to check against")
    ap.add_argument("--list", action="store_true", help="print the metric names used, one a line")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("files", nargs="*", help="*.json dashboards and *.yaml rule files")
    a = ap.parse_args()
    if a.selftest:
        return selftest()
    if not a.files or not (a.metrics or a.list):
        ap.error("give --metrics FILE or --list, and the files")
    usages = []
    for path in a.files:
        try:
            exprs = dashboard_exprs(path) if path.endswith(".json") else rule_exprs(path)
        except Exception as e:  # a parse error of JSON or YAML
            print(f"{path}: does not parse: {e}", file=sys.stderr)
            return 2
        if not exprs:
            print(f"{path}: no PromQL expression found", file=sys.stderr)
            return 2
        for where, expr in exprs:
            try:
                usages.append(parse_expr(where, expr))
            except ValueError as e:
                print(e, file=sys.stderr)
                return 2
    names = sorted(set().union(*(u.metrics for u in usages)))
    if a.list:
        print("\n".join(names))
        return 0
    with open(a.metrics, encoding="utf-8") as f:
        series = parse_exposition(f.read())
    missing, bad_labels = check(usages, series)
    print(f"{len(usages)} expressions use {len(names)} metric names; /metrics serves {len(series)} sample names")
    for name in sorted(missing):
        print(f"MISSING metric {name}  (used by {len(missing[name])}: {missing[name][0]}"
              f"{' ...' if len(missing[name]) > 1 else ''})")
    for where, text in bad_labels:
        print(f"MISSING {text}  ({where})")
    if missing or bad_labels:
        print(f"missing: {len(missing)} metric names: {' '.join(sorted(missing)) or '-'}; "
              f"{len(bad_labels)} label uses")
        return 1
    print("every metric and label the dashboard and the alerts use is served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
