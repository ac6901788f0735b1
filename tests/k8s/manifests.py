#!/usr/bin/env python3
"""manifests.py -- the checks of tests/k8s/check on rendered manifests.

    manifests.py ROOT RENDERED.json [--worker BUILD/agentq-worker]

RENDERED.json: {"renders": {SOURCE: [object, ...]}} where SOURCE names what
was rendered ("base", "base+components/keda", "overlays/dev", ...).

What must line up between the manifests, the worker and the Dockerfile:
the image (the one `images:` entry), the probes (the worker's real health
endpoints on metrics.listen's port), the grace period (above
worker.drain_seconds), the ScaledObject's queues (the ingress queue and
every lane the worker declares from the config), the PDB (the worker pods
and nothing else), the restricted Pod Security Standard on every pod, no
namespace anywhere, the Secret's keys, the user id. The worker's config is
read as the worker reads it: the defaults of src/base/config.c, then the
agentq.conf the ConfigMap mounts, then the environment the pod sets (with
--worker, `agentq-worker --print-config` reads the file instead, which also
rejects an invalid one).

Prints one line per problem and exits 1 if there is any; 0 otherwise.
"""
import json
import os
import re
import subprocess
import sys
import urllib.parse

import yaml

ROOT = sys.argv[1]
RENDERED = json.load(open(sys.argv[2]))["renders"]
WORKER = sys.argv[sys.argv.index("--worker") + 1] if "--worker" in sys.argv else None
K8S = os.path.join(ROOT, "k8s")

problems = []
passed = []


def fail(msg):
    problems.append(msg)


def ok(msg):
    passed.append(msg)


def read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


# ---------------------------------------------------------------- the config

def config_table():
    """(section, key) -> default string, from the worker's own key table."""
    src = read("src/base/config.c")
    table = {}
    for m in re.finditer(r'\{"(\w+)",\s*"(\w+)",\s*K_\w+,\s*OFF\(\w+\),\s*"((?:[^"\\]|\\.)*)"', src):
        table[(m.group(1), m.group(2))] = m.group(3)
    if ("worker", "drain_seconds") not in table or ("amqp", "lanes") not in table:
        raise SystemExit("manifests.py: cannot read the key table of src/base/config.c")
    return table


def parse_libconfig(text):
    """The scalar settings of a libconfig file as {(group, key): value}.
    Groups nest (`name = { ... };`); lists and arrays are skipped whole."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    toks = re.findall(r'"(?:[^"\\]|\\.)*"|[A-Za-z_*][\w*-]*|[-+]?[0-9][\w.+-]*|[{}()\[\];,=:]|#[^\n]*|//[^\n]*', text)
    toks = [t for t in toks if not t.startswith("#") and not t.startswith("//")]
    out, path, i = {}, [], 0

    def skip_value(i):
        depth = 0
        while i < len(toks):
            t = toks[i]
            if t in "{([":
                depth += 1
            elif t in "})]":
                depth -= 1
                if depth == 0:
                    return i + 1
            elif depth == 0:
                return i + 1
            i += 1
        return i

    while i < len(toks):
        t = toks[i]
        if t == "}":
            path.pop()
            i += 1
        elif t in (";", ","):
            i += 1
        elif i + 2 < len(toks) and toks[i + 1] in ("=", ":"):
            v = toks[i + 2]
            if v == "{":
                path.append(t)
                i += 3
            elif v in ("(", "["):
                i = skip_value(i + 2)
            else:
                if v.startswith('"'):
                    # adjacent string literals concatenate
                    parts, j = [], i + 2
                    while j < len(toks) and toks[j].startswith('"'):
                        parts.append(json.loads(toks[j]))
                        j += 1
                    val, i = "".join(parts), j
                else:
                    val, i = v, i + 3
                out[(".".join(path), t)] = val
        else:
            i += 1
    return out


TABLE = config_table()


def effective_config(conf_text, env):
    """The values the worker runs with: defaults, the file, the environment."""
    cfg = dict(TABLE)
    if WORKER and os.access(WORKER, os.X_OK):
        tmp = os.path.join(os.path.dirname(sys.argv[2]), "agentq.conf.check")
        with open(tmp, "w") as f:
            f.write(conf_text)
        r = subprocess.run([WORKER, "-c", tmp, "--print-config"], capture_output=True, text=True,
                           # Only PATH: no AGENTQ_* of the caller's. A sanitizer
                           # build's leak report at exit is not the point here.
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ASAN_OPTIONS": "detect_leaks=0"})
        if r.returncode != 0:
            fail(f"agentq-worker --print-config refuses the ConfigMap's agentq.conf: {r.stderr.strip()}")
        else:
            cfg.update({k: v for k, v in parse_libconfig(r.stdout).items() if k in TABLE})
    else:
        for k, v in parse_libconfig(conf_text).items():
            if k not in TABLE:
                fail(f"agentq.conf sets {k[0]}.{k[1]}, which is not a key of src/base/config.c")
            cfg[k] = v
    for (sec, key) in TABLE:
        name = f"AGENTQ_{sec.upper()}_{key.upper()}"
        if name in env:
            cfg[(sec, key)] = env[name]
    return cfg


def ival(cfg, sec, key):
    try:
        return int(str(cfg[(sec, key)]), 0)
    except ValueError:
        raise SystemExit(f"manifests.py: {sec}.{key} = {cfg[(sec, key)]!r} is not an integer")


def queue_names(cfg):
    """What the worker declares and consumes: the ingress queue and the lanes
    (src/queue/broker.c, aq_broker_lane_queue), and what it must not count."""
    prefix, lanes = cfg[("amqp", "lane_prefix")], ival(cfg, "amqp", "lanes")
    quorum = cfg.get(("amqp", "queue_type"), "classic") == "quorum"
    bands = ival(cfg, "amqp", "priority_bands") if quorum else 1
    lane_queues = [f"{prefix}{i}.b{b}" if quorum else f"{prefix}{i}" for i in range(lanes) for b in range(bands)]
    others = [cfg[("amqp", "dead_queue")], cfg[("amqp", "dlx")], cfg[("amqp", "exchange")]]
    others += [cfg[("amqp", "retry_prefix")] + d.strip() for d in cfg[("amqp", "retry_delays")].split(",") if d.strip()]
    others += [cfg[("amqp", "queue")] + "x", "x" + cfg[("amqp", "queue")], prefix + "x", prefix]
    return [cfg[("amqp", "queue")]] + lane_queues, others


# ----------------------------------------------------------- object helpers

def objs(src, kind=None, name=None):
    return [o for o in RENDERED[src] if (kind is None or o.get("kind") == kind)
            and (name is None or o.get("metadata", {}).get("name") == name)]


POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_templates(src):
    for o in RENDERED[src]:
        if o.get("kind") in POD_KINDS:
            yield o, o["spec"]["template"]
        elif o.get("kind") == "CronJob":
            yield o, o["spec"]["jobTemplate"]["spec"]["template"]
        elif o.get("kind") == "Pod":
            yield o, o


def containers(pod_spec):
    return [("initContainer", c) for c in pod_spec.get("initContainers", [])] + \
           [("container", c) for c in pod_spec.get("containers", [])]


def oname(o):
    return f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"


def selects(match_labels, labels):
    return all(labels.get(k) == v for k, v in match_labels.items())


# ------------------------------------------------- the kustomization files

def kustomization_files():
    for d, _, files in os.walk(K8S):
        if os.path.relpath(d, K8S).split(os.sep)[0] == "monitoring":
            continue
        for f in files:
            if f in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
                yield os.path.relpath(os.path.join(d, f), ROOT), yaml.safe_load(open(os.path.join(d, f)))


entries = []
for rel, k in kustomization_files():
    for e in k.get("images") or []:
        entries.append((rel, e))
    if "namespace" in k:
        fail(f"{rel} sets namespace: {k['namespace']!r}; the manifests must stay namespace-agnostic")
agentq_entries = [(rel, e) for rel, e in entries if e.get("name") == "agentq"]
if len(agentq_entries) != 1:
    fail(f"want exactly one `images:` entry for agentq in k8s/, found {len(agentq_entries)}: "
         + ", ".join(rel for rel, _ in agentq_entries))
    IMAGE = None
else:
    rel, e = agentq_entries[0]
    base_name = e.get("newName", "agentq")
    if e.get("digest"):
        IMAGE = f"{base_name}@{e['digest']}"
    elif e.get("newTag"):
        IMAGE = f"{base_name}:{e['newTag']}"
    else:
        IMAGE = None
        fail(f"{rel}: the agentq image entry sets neither newTag nor digest")
    IMAGE_NAMES = {"agentq", base_name}
    ok(f"one images: entry ({rel}): {IMAGE}")


def image_name(ref):
    ref = ref.split("@")[0]
    last = ref.rsplit("/", 1)[-1]
    return ref.rsplit(":", 1)[0] if ":" in last else ref


# --------------------------------------------------------- the Dockerfile

dockerfile = read("Dockerfile")
args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG\s+(\w+)=(\S+)", dockerfile, re.M)}
stages, final_stage_lines, docker_user = set(), [], None
for line in dockerfile.splitlines():
    m = re.match(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
    if m:
        ref = re.sub(r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
        if ref not in stages:
            tag = ref.split("@")[0].rsplit("/", 1)[-1]
            pinned = ("@sha256:" in ref and re.search(r"@sha256:[0-9a-f]{64}$", ref)) or \
                re.fullmatch(r"[\w.-]+:\d+\.\d+(\.\d+)?(-[\w.]+)?", tag)
            if not pinned:
                fail(f"Dockerfile: FROM {ref} is not pinned (want a point release such as debian:12.15-slim, or @sha256:<digest>)")
        if m.group(2):
            stages.add(m.group(2))
        final_stage_lines = []
    final_stage_lines.append(line)
final = "\n".join(final_stage_lines)
for label in ("title", "description", "source", "licenses", "version"):
    if not re.search(rf"org\.opencontainers\.image\.{label}=", final):
        fail(f"Dockerfile: the final stage has no LABEL org.opencontainers.image.{label}")
if not re.search(r"org\.opencontainers\.image\.version=\"?\$\{?\w+", final):
    fail("Dockerfile: org.opencontainers.image.version should come from an ARG (docker build --build-arg VERSION=...)")
users = re.findall(r"^USER\s+(\S+)", final, re.M)
if not users:
    fail("Dockerfile: the final stage sets no USER")
else:
    docker_user = users[-1]
    m = re.fullmatch(r"(\d+):(\d+)", docker_user)
    if not m or int(m.group(1)) == 0:
        fail(f"Dockerfile: USER {docker_user} must be a numeric non-root uid:gid (runAsNonRoot can only verify a number)")
        docker_user = None
    else:
        docker_user = (int(m.group(1)), int(m.group(2)))
        ok(f"Dockerfile: pinned FROM, OCI labels, USER {docker_user[0]}:{docker_user[1]}")


# -------------------------------------------------- the Secret's keys

template = yaml.safe_load(read("k8s/secret.template.yaml"))
TEMPLATE_KEYS = set((template.get("stringData") or {}).keys()) | set((template.get("data") or {}).keys())
SECRET_NAME = template["metadata"]["name"]


def secret_refs(pod_spec):
    """(secret, key, optional) the pod reads."""
    out = []
    for _, c in containers(pod_spec):
        for e in c.get("env", []):
            r = (e.get("valueFrom") or {}).get("secretKeyRef")
            if r:
                out.append((r["name"], r["key"], bool(r.get("optional"))))
    return out


# ------------------------------------------------------------- per render

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def check_pod_security(src, o, tpl):
    """The restricted Pod Security Standard (the fields it checks)."""
    spec, where = tpl["spec"], f"{src}: {oname(o)}"
    psc = spec.get("securityContext", {})
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(f):
            fail(f"{where}: {f} is set (restricted PSS)")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            fail(f"{where}: volume {v['name']} is {sorted(kinds)} (restricted PSS allows {sorted(RESTRICTED_VOLUMES)})")
    if (psc.get("seLinuxOptions") or {}).get("type") not in (None, "container_t", "container_init_t", "container_kvm_t"):
        fail(f"{where}: seLinuxOptions.type not allowed (restricted PSS)")
    for what, c in containers(spec):
        csc, cw = c.get("securityContext", {}), f"{where} {what} {c['name']}"
        nonroot = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if nonroot is not True:
            fail(f"{cw}: runAsNonRoot is not true (restricted PSS)")
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if uid is None or not isinstance(uid, int) or uid == 0:
            fail(f"{cw}: runAsUser must be a numeric non-zero uid (got {uid!r})")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(f"{cw}: allowPrivilegeEscalation is not false (restricted PSS)")
        if csc.get("privileged"):
            fail(f"{cw}: privileged (restricted PSS)")
        caps = csc.get("capabilities", {})
        if "ALL" not in (caps.get("drop") or []):
            fail(f"{cw}: capabilities.drop lacks ALL (restricted PSS)")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            fail(f"{cw}: capabilities.add {caps['add']} (restricted PSS allows NET_BIND_SERVICE only)")
        sp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if sp not in ("RuntimeDefault", "Localhost"):
            fail(f"{cw}: seccompProfile is {sp!r}, want RuntimeDefault (restricted PSS)")
        for p in c.get("ports", []):
            if p.get("hostPort"):
                fail(f"{cw}: hostPort {p['hostPort']} (restricted PSS)")
        if IMAGE and image_name(c.get("image", "")) in IMAGE_NAMES:
            if c["image"] != IMAGE:
                fail(f"{cw}: image {c['image']!r}, want {IMAGE!r} (the images: entry)")
            gid = csc.get("runAsGroup", psc.get("runAsGroup"))
            if docker_user and (uid, gid) != docker_user:
                fail(f"{cw}: runs as {uid}:{gid}, the Dockerfile's USER is {docker_user[0]}:{docker_user[1]}")


summary = {}
for src, objects in sorted(RENDERED.items()):
    if not objects:
        fail(f"{src}: renders no object")
        continue
    for o in objects:
        ns = o.get("metadata", {}).get("namespace")
        if ns:
            fail(f"{src}: {oname(o)} names namespace {ns!r}")
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    pods = list(pod_templates(src))
    for o, tpl in pods:
        check_pod_security(src, o, tpl)
        if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet"):
            if not selects(o["spec"]["selector"].get("matchLabels", {}), tpl["metadata"].get("labels", {})):
                fail(f"{src}: {oname(o)}: its selector does not match its pod template's labels")
        spec = tpl["spec"]
        for v in spec.get("volumes", []):
            if "configMap" in v and not v["configMap"].get("optional") and ("ConfigMap", v["configMap"]["name"]) not in names:
                fail(f"{src}: {oname(o)} mounts ConfigMap {v['configMap']['name']!r}, which the render does not hold")
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", sa) not in names:
            fail(f"{src}: {oname(o)} runs as ServiceAccount {sa!r}, which the render does not hold")
        for sname, key, optional in secret_refs(spec):
            if sname == SECRET_NAME and key not in TEMPLATE_KEYS and not optional:
                fail(f"{src}: {oname(o)} reads {sname}/{key}, which k8s/secret.template.yaml does not have")
            gen = objs(src, "Secret", sname)
            if gen and not optional:
                data = {**(gen[0].get("data") or {}), **(gen[0].get("stringData") or {})}
                if key not in data:
                    fail(f"{src}: {oname(o)} reads {sname}/{key}, which the Secret {sname} of this render lacks")

    workers = objs(src, "Deployment", "agentq-worker")
    if src in ("migrate", "producer"):
        continue
    if len(workers) != 1:
        fail(f"{src}: want one Deployment agentq-worker, found {len(workers)}")
        continue
    dep = workers[0]
    tpl = dep["spec"]["template"]
    spec = tpl["spec"]
    pod_labels = tpl["metadata"].get("labels", {})
    worker = [c for c in spec["containers"] if c["name"] == "worker"]
    if not worker:
        fail(f"{src}: agentq-worker has no container named worker")
        continue
    c = worker[0]

    # The config the pod runs with.
    args_ = c.get("args", [])
    conf_path = args_[args_.index("-c") + 1] if "-c" in args_ else None
    conf_text = None
    for m in c.get("volumeMounts", []):
        if conf_path and conf_path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = [v for v in spec.get("volumes", []) if v["name"] == m["name"]]
            cm = objs(src, "ConfigMap", vol[0]["configMap"]["name"]) if vol and "configMap" in vol[0] else []
            fname = conf_path[len(m["mountPath"].rstrip("/")) + 1:]
            if cm and fname in cm[0].get("data", {}):
                conf_text = cm[0]["data"][fname]
    if conf_text is None:
        fail(f"{src}: the worker's -c {conf_path} is not a file of a ConfigMap the render mounts there")
        continue
    env = {}
    for ef in c.get("envFrom", []):
        ref = ef.get("configMapRef")
        if ref:
            cm = objs(src, "ConfigMap", ref["name"])
            if cm:
                env.update(cm[0].get("data", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    cfg = effective_config(conf_text, env)
    drain = ival(cfg, "worker", "drain_seconds")
    concurrency = ival(cfg, "worker", "concurrency")

    # Grace period above the drain.
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < drain + 10:
        fail(f"{src}: terminationGracePeriodSeconds {grace} is not above worker.drain_seconds {drain} "
             f"by at least 10 s (the requeue after the drain needs the time; the kubelet kills at the grace period)")

    # Probes on the real endpoints and port.
    metrics_src = read("src/worker/metrics.c")
    listen = cfg[("metrics", "listen")]
    port = int(listen.rsplit(":", 1)[1]) if ":" in listen else None
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        if f'"{path}"' not in metrics_src:
            fail(f"src/worker/metrics.c no longer serves {path}; update the probe check")
        pr = c.get(probe)
        get = (pr or {}).get("httpGet")
        if not get:
            fail(f"{src}: the worker has no {probe} with httpGet")
            continue
        if get.get("path") != path:
            fail(f"{src}: {probe} asks {get.get('path')!r}, the worker serves {path} there")
        pp = get.get("port")
        num = ports.get(pp) if isinstance(pp, str) else pp
        if num != port:
            fail(f"{src}: {probe} port {pp!r} is {num}, metrics.listen is {listen!r}")
    ann = tpl["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann and str(port) != ann["prometheus.io/port"]:
        fail(f"{src}: prometheus.io/port {ann['prometheus.io/port']} is not metrics.listen's port {port}")

    # PDB: the worker pods, nothing else.
    for pdb in objs(src, "PodDisruptionBudget"):
        ml = pdb["spec"].get("selector", {}).get("matchLabels", {})
        if not ml or not selects(ml, pod_labels):
            fail(f"{src}: PodDisruptionBudget {pdb['metadata']['name']} selects {ml}, not the worker pods {pod_labels}")
        # Every pod that may share the namespace: the Jobs and dev servers of
        # the other renders too.
        for other in RENDERED:
            for o, t in pod_templates(other):
                if oname(o) != oname(dep) and selects(ml, t["metadata"].get("labels", {})):
                    fail(f"{src}: PodDisruptionBudget {pdb['metadata']['name']} also selects the pods of {oname(o)} ({other})")
        if "maxUnavailable" not in pdb["spec"] and "minAvailable" not in pdb["spec"]:
            fail(f"{src}: PodDisruptionBudget {pdb['metadata']['name']} sets neither maxUnavailable nor minAvailable")
    if src.startswith("base") or src.startswith("overlays/"):
        if not objs(src, "PodDisruptionBudget"):
            fail(f"{src}: no PodDisruptionBudget for the workers")

    # Autoscalers.
    sos = objs(src, "ScaledObject")
    hpas = objs(src, "HorizontalPodAutoscaler")
    if sos and hpas:
        fail(f"{src}: both a ScaledObject and an HPA: two autoscalers on one Deployment fight")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
            fail(f"{src}: HPA {hpa['metadata']['name']} scales {ref}, not the worker Deployment")
        for m in hpa["spec"].get("metrics", []):
            if m.get("type") == "Pods":
                mname = m["pods"]["metric"]["name"]
                if f'"{mname}"' not in read("src/worker/worker.c"):
                    fail(f"{src}: HPA scales on {mname!r}, which the worker does not export")
                avg = m["pods"]["target"].get("averageValue")
                if avg is not None and float(str(avg)) > concurrency:
                    fail(f"{src}: HPA target {avg} is above worker.concurrency {concurrency}: it can never be reached")
    for so in sos:
        w = f"{src}: ScaledObject {so['metadata']['name']}"
        ref = so["spec"]["scaleTargetRef"]
        if ref.get("name") != dep["metadata"]["name"] or ref.get("kind", "Deployment") != "Deployment":
            fail(f"{w} scales {ref}, not Deployment/{dep['metadata']['name']}")
        lo, hi = so["spec"].get("minReplicaCount", 0), so["spec"].get("maxReplicaCount", 100)
        fb = so["spec"].get("fallback")
        if not fb:
            fail(f"{w} has no fallback (what to run when the management API cannot be read)")
        elif not (fb.get("failureThreshold", 0) >= 1 and lo <= fb.get("replicas", -1) <= hi):
            fail(f"{w}: fallback {fb} must have failureThreshold >= 1 and {lo} <= replicas <= {hi}")
        trig = [t for t in so["spec"]["triggers"] if t["type"] == "rabbitmq"]
        if len(trig) != 1 or len(so["spec"]["triggers"]) != 1:
            fail(f"{w}: want exactly one rabbitmq trigger summing every queue (the HPA takes the max over "
                 f"triggers, not the sum), found {len(so['spec']['triggers'])} triggers")
            continue
        t, md = trig[0], trig[0]["metadata"]
        for k, want in (("protocol", "http"), ("mode", "QueueLength"), ("useRegex", "true"), ("operation", "sum")):
            if str(md.get(k)) != want:
                fail(f"{w}: trigger {k} is {md.get(k)!r}, want {want!r}")
        want_q, not_q = queue_names(cfg)
        try:
            rx = re.compile(md.get("queueName", ""))
        except re.error as e:
            fail(f"{w}: queueName is not a regular expression: {e}")
            continue
        missing = [q for q in want_q if not rx.search(q)]
        extra = [q for q in not_q if rx.search(q)]
        if missing:
            fail(f"{w}: queueName {md.get('queueName')!r} misses {len(missing)} of the {len(want_q)} queues the worker "
                 f"consumes: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            fail(f"{w}: queueName {md.get('queueName')!r} also matches {', '.join(extra)}, which must not count")
        page = int(md.get("pageSize", 100))
        if not len(want_q) <= page <= 500:
            fail(f"{w}: pageSize {page} must cover the {len(want_q)} matching queues (and RabbitMQ caps it at 500)")
        if str(md.get("value")) != str(concurrency):
            fail(f"{w}: value {md.get('value')!r} is not worker.concurrency {concurrency}")
        auth = (t.get("authenticationRef") or {}).get("name")
        tas = objs(src, "TriggerAuthentication", auth)
        if not tas:
            fail(f"{w}: authenticationRef {auth!r} is not a TriggerAuthentication of the render")
            continue
        params = {r["parameter"]: r for r in tas[0]["spec"].get("secretTargetRef", [])}
        for p in ("host", "username", "password"):
            if p not in params:
                fail(f"{src}: TriggerAuthentication {auth}: no {p!r} parameter (user and password must be "
                     "separate keys: a password with special characters breaks the URL form)")
                continue
            r = params[p]
            if r["name"] == SECRET_NAME and r["key"] not in TEMPLATE_KEYS:
                fail(f"{src}: TriggerAuthentication {auth} reads {r['name']}/{r['key']}, not in k8s/secret.template.yaml")
            gen = objs(src, "Secret", r["name"])
            if gen and r["key"] not in (gen[0].get("data") or {}):
                fail(f"{src}: TriggerAuthentication {auth} reads {r['name']}/{r['key']}, which this render's Secret lacks")
        # The vhost KEDA asks about is the one the worker connects to.
        urls = []
        gen = objs(src, "Secret", SECRET_NAME)
        if gen and "AGENTQ_AMQP_URL" in (gen[0].get("data") or {}):
            import base64
            urls.append(("the generated Secret", base64.b64decode(gen[0]["data"]["AGENTQ_AMQP_URL"]).decode()))
        urls.append(("k8s/secret.template.yaml", template["stringData"]["AGENTQ_AMQP_URL"]))
        for where, url in urls:
            vhost = urllib.parse.unquote(urllib.parse.urlsplit(url.split(",")[0]).path[1:] or "/")
            if md.get("vhostName") and md["vhostName"] != vhost:
                fail(f"{w}: vhostName {md['vhostName']!r} is not the vhost {vhost!r} of AGENTQ_AMQP_URL in {where}")
        summary[src] = f"{len(want_q)} queues"
    ok(f"{src}: worker image, probes {listen}, grace {grace} > drain {drain}"
       + (f", ScaledObject on {summary[src]}" if src in summary else "")
       + (", HPA" if hpas else ""))

for src in RENDERED:
    if src.startswith("overlays/") and not objs(src, "ScaledObject") and not objs(src, "HorizontalPodAutoscaler"):
        fail(f"{src}: an overlay without an autoscaler")

# `kubectl apply -k PATH` in the docs and comments names a kustomization.
said, before = set(), len(problems)
for rel in ["README.md", "docs/deploy.md"] + [os.path.relpath(os.path.join(d, f), ROOT)
                                              for d, _, fs in os.walk(K8S) for f in fs if f.endswith((".yaml", ".md"))]:
    for m in re.finditer(r"apply -k (k8s[\w/.-]*)", read(rel)):
        p = m.group(1).rstrip("/.")
        said.add(p)
        if not os.path.isfile(os.path.join(ROOT, p, "kustomization.yaml")):
            fail(f"{rel}: `kubectl apply -k {p}`: {p} has no kustomization.yaml")
if len(problems) == before:
    ok(f"every `apply -k` path in the docs and manifests exists ({len(said)} paths)")

for p in passed:
    print(f"ok: {p}")
for p in problems:
    print(f"FAIL: {p}")
sys.exit(1 if problems else 0)
