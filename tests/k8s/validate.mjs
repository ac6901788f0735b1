// tests/k8s/validate.mjs — validates rendered Kubernetes objects against
// their schemas, kubeconform-style, offline.
//
//   node tests/k8s/validate.mjs TOOLS_DIR OBJECTS.json
//
// OBJECTS.json: [{"source": "overlays/dev", "object": {...}}, ...] (what
// tests/k8s/check rendered). TOOLS_DIR holds node_modules with
// kubernetes-models (the Kubernetes OpenAPI schemas compiled to ajv
// validators, one model class per kind), @kubernetes-models/keda (KEDA's
// CRD schemas, the same way) and typescript.
//
// Two passes, because neither alone is what kubeconform -strict does:
//   1. each object's model .validate(): types, required fields, enums,
//      formats (int-or-string, quantities, ...) from the JSON schema;
//   2. tsc over one typed constant per object: the models' TypeScript
//      interfaces list every field a kind has, so an excess-property error
//      is an unknown field (a typo such as `livenesProbe` is not an error in
//      pass 1: the schemas allow additional properties).
// An apiVersion/kind with no model is an error, never a silent pass.
// Exit 0: all valid; 1: an object is invalid (each problem printed); 2: usage.
import { pathToFileURL } from "node:url";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const [toolsDir, objectsFile] = process.argv.slice(2);
if (!toolsDir || !objectsFile) {
    console.error("usage: validate.mjs TOOLS_DIR OBJECTS.json");
    process.exit(2);
}
const items = JSON.parse(fs.readFileSync(objectsFile, "utf8"));

// The module that holds a group/version's models.
function moduleFor(apiVersion) {
    const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
    if (group === "") return `kubernetes-models/${version}`;
    if (group === "keda.sh") return `@kubernetes-models/keda/keda.sh/${version}`;
    if (group.endsWith(".k8s.io") || !group.includes(".")) return `kubernetes-models/${group}/${version}`;
    return null;
}

// The package directory of a module spec, and the subpath in it.
function split(spec) {
    const parts = spec.split("/");
    const n = spec.startsWith("@") ? 2 : 1;
    return [parts.slice(0, n).join("/"), parts.slice(n).join("/")];
}

// kubernetes-models 5 is ESM (index.js, behind an exports map that has no
// `require`); 4 ships both index.js (CommonJS) and index.mjs. Load the ES
// module file directly: index.mjs where there is one, else index.js.
async function load(spec) {
    const [pkg, sub] = split(spec);
    const dir = path.join(path.resolve(toolsDir), "node_modules", pkg, sub);
    for (const f of ["index.mjs", "index.js"]) {
        const p = path.join(dir, f);
        if (fs.existsSync(p)) {
            const m = await import(pathToFileURL(p).href);
            return m.default && Object.keys(m).length === 1 ? m.default : m;
        }
    }
    return null;
}

let problems = 0;
const where = (it) => `${it.source}: ${it.object.kind}/${it.object.metadata?.name ?? "?"}`;
const tsLines = [];
const tsImports = new Map();

for (const [i, it] of items.entries()) {
    const { apiVersion, kind } = it.object;
    const spec = apiVersion && kind ? moduleFor(apiVersion) : null;
    let mod = null;
    try {
        mod = spec ? await load(spec) : null;
    } catch (e) {
        console.log(`${where(it)}: cannot load the models of ${spec}: ${e.message}`);
        problems++;
        continue;
    }
    const Model = mod && mod[kind];
    if (!Model || typeof Model !== "function") {
        console.log(`${where(it)}: no schema for apiVersion ${apiVersion} kind ${kind} (not in kubernetes-models or @kubernetes-models/keda)`);
        problems++;
        continue;
    }
    // kustomize wraps long base64 values of a Secret's data over lines; the
    // API server's base64 decoding (Go's encoding/base64) skips newlines,
    // the schema's "byte" format does not: check them as the server reads them.
    let obj = it.object;
    if (kind === "Secret" && obj.data) {
        obj = { ...obj, data: Object.fromEntries(Object.entries(obj.data).map(([k, v]) => [k, String(v).replace(/[\r\n]/g, "")])) };
    }
    try {
        new Model(obj).validate();
    } catch (e) {
        console.log(`${where(it)}: schema: ${e.message}`);
        problems++;
    }
    // Both majors ship <module>/<Kind>.d.ts exporting I<Kind>.
    const alias = `T${tsImports.size}`;
    const key = `${spec}/${kind}`;
    if (!tsImports.has(key)) tsImports.set(key, { alias, kind });
    const t = tsImports.get(key);
    tsLines.push({ i, text: `export const o${i}: ${t.alias} = ${JSON.stringify(it.object)};` });
}

// Pass 2: unknown fields.
if (tsLines.length) {
    const dir = fs.mkdtempSync(path.join(path.resolve(toolsDir), "tsc-"));
    const header = [...tsImports.entries()].map(([key, t]) => `import type { I${t.kind} as ${t.alias} } from "${key}";`);
    const body = tsLines.map((l) => l.text);
    fs.writeFileSync(path.join(dir, "objects.ts"), [...header, ...body, ""].join("\n"));
    fs.writeFileSync(path.join(dir, "tsconfig.json"), JSON.stringify({
        compilerOptions: {
            strict: true, noEmit: true, skipLibCheck: true, module: "esnext", target: "es2020",
            moduleResolution: "bundler", types: [],
        },
        files: ["objects.ts"],
    }));
    const tsc = path.join(path.resolve(toolsDir), "node_modules", "typescript", "bin", "tsc");
    let out = "";
    try {
        execFileSync(process.execPath, [tsc, "-p", "."], { cwd: dir, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    } catch (e) {
        out = `${e.stdout || ""}${e.stderr || ""}`;
        if (!out.trim()) out = String(e);
    }
    for (const line of out.split("\n")) {
        const m = /^objects\.ts\((\d+),(\d+)\): error (TS\d+): (.*)$/.exec(line.trim());
        if (!m) {
            if (line.trim() && !/^\s/.test(line)) { console.log(`tsc: ${line.trim()}`); problems++; }
            continue;
        }
        const n = Number(m[1]) - 1 - header.length;
        const it = n >= 0 && n < tsLines.length ? items[tsLines[n].i] : null;
        // The message names the field; the long inferred type adds nothing.
        const msg = m[4].replace(/ does not exist in type '.*$/, " is not a field of this object (unknown field)");
        console.log(`${it ? where(it) : "objects.ts"}: ${msg}`);
        problems++;
    }
    fs.rmSync(dir, { recursive: true, force: true });
}

const kinds = new Set(items.map((it) => `${it.object.apiVersion}/${it.object.kind}`));
if (problems) {
    console.log(`${problems} schema problem(s) in ${items.length} objects`);
    process.exit(1);
}
console.log(`${items.length} objects of ${kinds.size} kinds valid (schema and unknown-field checks)`);
