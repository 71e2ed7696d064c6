// The policy editor: drafts (one policy each) edited through a form for the
// NetworkPolicy and CiliumNetworkPolicy basics or as YAML; the server
// validates with the agent's parser and each problem is shown at its field;
// the what-if delta against the live policies and flows comes before apply.
import { useEffect, useState } from "preact/hooks";
import YAML from "yaml";
import { api } from "./api.js";
import { VERDICT_COLOURS } from "./map.jsx";

export const NP_TEMPLATE = {
  apiVersion: "networking.k8s.io/v1",
  kind: "NetworkPolicy",
  metadata: { name: "new-policy", namespace: "default" },
  spec: { podSelector: {}, policyTypes: ["Ingress"] },
};
export const CNP_TEMPLATE = {
  apiVersion: "cilium.io/v2",
  kind: "CiliumNetworkPolicy",
  metadata: { name: "new-policy", namespace: "default" },
  spec: { endpointSelector: {}, ingress: [{}] },
};

export const dump = (obj) => YAML.stringify(obj, { lineWidth: 0 });

// -- the form's fields, as paths into the document --------------------------
const isNP = (doc) => doc && doc.kind === "NetworkPolicy";
const selectorKey = (doc) => (isNP(doc) ? "podSelector" : "endpointSelector");
const peerKey = (doc, dir) => (isNP(doc) ? (dir === "ingress" ? "from" : "to") : dir === "ingress" ? "fromEndpoints" : "toEndpoints");

function get(obj, path) {
  return path.reduce((o, k) => (o == null ? undefined : o[k]), obj);
}
function set(obj, path, value) {
  const copy = structuredClone(obj);
  let o = copy;
  path.slice(0, -1).forEach((k, i) => {
    if (o[k] == null || typeof o[k] !== "object") o[k] = typeof path[i + 1] === "number" ? [] : {};
    o = o[k];
  });
  const last = path[path.length - 1];
  if (value === undefined) {
    if (Array.isArray(o)) o.splice(last, 1); else delete o[last];
  } else o[last] = value;
  return copy;
}
export const pathText = (path) => path.reduce((s, k) => (typeof k === "number" ? `${s}[${k}]` : s ? `${s}.${k}` : k), "");

const labelsText = (m) => Object.entries(m || {}).map(([k, v]) => `${k}=${v}`).join(", ");
function parseLabels(text) {
  const out = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    out[i < 0 ? part : part.slice(0, i).trim()] = i < 0 ? "" : part.slice(i + 1).trim();
  }
  return out;
}
const portValue = (text) => (/^\d+$/.test(text.trim()) ? Number(text.trim()) : text.trim());

function portsPath(doc, dir, i) {
  return isNP(doc) ? ["spec", dir, i, "ports"] : ["spec", dir, i, "toPorts", 0, "ports"];
}

// problems of document `index` at `field` (and below it when `prefix`)
function problemsAt(problems, index, field, prefix = false) {
  return problems.filter((p) => (p.document == null || p.document === index) &&
    (p.field === field || (prefix && field && p.field.startsWith(field + "."))));
}

function FieldErrors({ problems }) {
  return problems.map((p) => <div class="field-error" data-testid="field-error" data-field={p.field}>{p.message}</div>);
}

function Field({ label, value, onInput, problems, testid, placeholder }) {
  return (
    <label class={`field ${problems.length ? "invalid" : ""}`}>
      <span>{label}</span>
      <input value={value} placeholder={placeholder} data-testid={testid} onInput={(e) => onInput(e.currentTarget.value)} />
      <FieldErrors problems={problems} />
    </label>
  );
}

function PolicyForm({ doc, index, problems, onChange }) {
  const at = (path, prefix = false) => problemsAt(problems, index, pathText(path), prefix);
  const setPath = (path, value) => onChange(set(doc, path, value));
  const sel = selectorKey(doc);
  const directions = ["ingress", "egress"];
  const enforced = (dir) => (isNP(doc) ? (doc.spec?.policyTypes || []).includes(dir === "ingress" ? "Ingress" : "Egress") : Array.isArray(doc.spec?.[dir]));
  const toggle = (dir, on) => {
    if (isNP(doc)) {
      const name = dir === "ingress" ? "Ingress" : "Egress";
      const types = new Set(doc.spec?.policyTypes || []);
      if (on) types.add(name); else types.delete(name);
      let d = set(doc, ["spec", "policyTypes"], ["Ingress", "Egress"].filter((t) => types.has(t)));
      if (!on) d = set(d, ["spec", dir], undefined);
      onChange(d);
    } else {
      onChange(set(doc, ["spec", dir], on ? [{}] : undefined));
    }
  };
  return (
    <div class="form" data-testid="policy-form">
      <div class="row">
        <label class="field"><span>kind</span>
          <select value={doc.kind} data-testid="form-kind" onChange={(e) => {
            const tpl = e.currentTarget.value === "NetworkPolicy" ? NP_TEMPLATE : CNP_TEMPLATE;
            onChange({ ...structuredClone(tpl), metadata: doc.metadata });
          }}>
            <option value="NetworkPolicy">NetworkPolicy</option>
            <option value="CiliumNetworkPolicy">CiliumNetworkPolicy</option>
          </select>
        </label>
        <Field label="name" value={doc.metadata?.name || ""} testid="form-name" problems={at(["metadata", "name"])} onInput={(v) => setPath(["metadata", "name"], v)} />
        <Field label="namespace" value={doc.metadata?.namespace || ""} testid="form-namespace" problems={at(["metadata", "namespace"])} onInput={(v) => setPath(["metadata", "namespace"], v)} />
      </div>
      <Field label={`${sel} (labels k=v, …; empty: every pod of the namespace)`} value={labelsText(doc.spec?.[sel]?.matchLabels)} testid="form-selector"
        problems={at(["spec", sel], true)} onInput={(v) => setPath(["spec", sel], Object.keys(parseLabels(v)).length ? { matchLabels: parseLabels(v) } : {})} />
      {directions.map((dir) => (
        <fieldset class="direction">
          <legend>
            <label><input type="checkbox" checked={enforced(dir)} data-testid={`form-${dir}-enforced`} onChange={(e) => toggle(dir, e.currentTarget.checked)} /> {dir}{isNP(doc) ? " (policyTypes)" : ""}</label>
          </legend>
          {enforced(dir) && (doc.spec?.[dir] || []).map((rule, i) => (
            <RuleForm doc={doc} dir={dir} i={i} rule={rule} at={at} setPath={setPath} onChange={onChange} />
          ))}
          {enforced(dir) && <button class="small" data-testid={`form-add-${dir}`} onClick={() => setPath(["spec", dir, (doc.spec?.[dir] || []).length], {})}>+ {dir} rule</button>}
          {enforced(dir) && !(doc.spec?.[dir] || []).length && <p class="muted">no rule: everything {dir === "ingress" ? "to" : "from"} the selected pods is denied</p>}
          <FieldErrors problems={at(["spec", dir]).concat(at(["spec", "policyTypes"], true))} />
        </fieldset>
      ))}
    </div>
  );
}

function RuleForm({ doc, dir, i, rule, at, setPath, onChange }) {
  const pk = peerKey(doc, dir);
  const peerPath = isNP(doc) ? ["spec", dir, i, pk, 0, "podSelector"] : ["spec", dir, i, pk, 0];
  const ports = get(doc, portsPath(doc, dir, i)) || [];
  const pp = portsPath(doc, dir, i);
  return (
    <div class="rule" data-testid={`rule-${dir}-${i}`}>
      <div class="row">
        <Field label={`${isNP(doc) ? pk + " podSelector" : pk} (k=v, …; empty: any)`} testid={`rule-${dir}-${i}-peer`}
          value={labelsText(get(doc, [...peerPath, "matchLabels"]))} problems={at(["spec", dir, i, pk], true)}
          onInput={(v) => {
            const labels = parseLabels(v);
            onChange(Object.keys(labels).length ? set(doc, [...peerPath, "matchLabels"], labels) : set(doc, ["spec", dir, i, pk], undefined));
          }} />
        <button class="small danger" onClick={() => setPath(["spec", dir, i], undefined)}>remove rule</button>
      </div>
      <div class="ports">
        {ports.map((p, j) => (
          <div class="row">
            <Field label="port" value={String(p.port ?? "")} testid={`rule-${dir}-${i}-port-${j}`} problems={at([...pp, j, "port"]).concat(at([...pp, j]))}
              onInput={(v) => setPath([...pp, j, "port"], isNP(doc) ? portValue(v) : v.trim())} />
            <label class="field"><span>protocol</span>
              <select value={p.protocol || "TCP"} onChange={(e) => setPath([...pp, j, "protocol"], e.currentTarget.value)}>
                {["TCP", "UDP", "SCTP"].map((x) => <option value={x}>{x}</option>)}
              </select>
            </label>
            <button class="small danger" onClick={() => setPath([...pp, j], undefined)}>×</button>
          </div>
        ))}
        <button class="small" data-testid={`rule-${dir}-${i}-add-port`} onClick={() => setPath([...pp, ports.length], { port: isNP(doc) ? 80 : "80", protocol: "TCP" })}>+ port</button>
        <FieldErrors problems={at(pp)} />
      </div>
    </div>
  );
}

// -- drafts, validation, what-if, apply -------------------------------------
export function EditorView({ drafts, setDrafts, current, setCurrent, info, windowSecs }) {
  const [problems, setProblems] = useState([]);
  const [delta, setDelta] = useState(null);
  const [busy, setBusy] = useState(null);
  const [message, setMessage] = useState(null);
  const [live, setLive] = useState([]);
  const text = drafts.map((d) => d.yaml.trim()).join("\n---\n") + "\n";

  useEffect(() => {
    api.policies().then((r) => setLive(r.policies.filter((p) => p.yaml))).catch(() => setLive([]));
  }, []);

  useEffect(() => {
    let stop = false;
    const t = setTimeout(() => {
      api.validate(text).then((r) => { if (!stop) setProblems(r.problems); })
        .catch((e) => { if (!stop) setProblems([{ document: null, field: "", message: e.message }]); });
    }, 250);
    setDelta(null);
    return () => { stop = true; clearTimeout(t); };
  }, [text]);

  const draft = drafts[current];
  let doc = null;
  let parseError = null;
  if (draft) {
    try { doc = YAML.parse(draft.yaml); } catch (e) { parseError = e.message; }
  }
  const formable = doc && typeof doc === "object" && ["NetworkPolicy", "CiliumNetworkPolicy"].includes(doc.kind);
  const update = (i, yaml) => setDrafts(drafts.map((d, j) => (j === i ? { ...d, yaml } : d)));
  const add = (tpl) => { setDrafts([...drafts, { yaml: dump(tpl) }]); setCurrent(drafts.length); };
  const remove = (i) => { setDrafts(drafts.filter((_, j) => j !== i)); setCurrent(Math.max(0, Math.min(current, drafts.length - 2))); };

  const whatif = async () => {
    setBusy("whatif"); setMessage(null);
    try { setDelta(await api.whatif(text, windowSecs)); } catch (e) { setMessage({ error: e.message }); if (e.body.problems) setProblems(e.body.problems); }
    setBusy(null);
  };
  const apply = async () => {
    setBusy("apply"); setMessage(null);
    try {
      const r = await api.apply(text);
      const names = (r.applied || []).map((p) => `${p.kind} ${p.namespace ? p.namespace + "/" : ""}${p.name}`);
      setMessage({ ok: `applied ${names.join(", ")} (revision ${r.revision})` });
    } catch (e) { setMessage({ error: e.message }); }
    setBusy(null);
  };
  const docName = (d) => { try { const o = YAML.parse(d.yaml); return `${o?.metadata?.name || "?"}`; } catch (e) { return "(YAML error)"; } };
  const own = problems.filter((p) => p.document == null || p.document === current);
  const unplaced = formable ? own.filter((p) => !p.field) : own;

  return (
    <div class="editor-layout">
      <div class="drafts">
        <div class="tabs-small" data-testid="drafts">
          {drafts.map((d, i) => (
            <button class={i === current ? "active" : ""} data-testid={`draft-${i}`} onClick={() => setCurrent(i)}>
              {docName(d)}{problems.some((p) => p.document === i) ? " ⚠" : ""}
            </button>
          ))}
          <button class="small" data-testid="new-np" onClick={() => add(NP_TEMPLATE)}>+ NetworkPolicy</button>
          <button class="small" data-testid="new-cnp" onClick={() => add(CNP_TEMPLATE)}>+ CiliumNetworkPolicy</button>
          {live.length > 0 && (
            <select class="small" data-testid="edit-live" value="" onChange={(e) => {
              const p = live[Number(e.currentTarget.value)];
              if (p) { setDrafts([...drafts, { yaml: p.yaml }]); setCurrent(drafts.length); }
            }}>
              <option value="">edit a live policy…</option>
              {live.map((p, i) => <option value={i}>{p.kind} {p.namespace ? `${p.namespace}/` : ""}{p.name}</option>)}
            </select>
          )}
        </div>
        {!draft && <p class="muted">No draft: start a new policy, or take a recommendation.</p>}
        {draft && (
          <div class="draft">
            {formable ? <PolicyForm doc={doc} index={current} problems={problems} onChange={(d) => update(current, dump(d))} />
              : <p class="muted">{parseError ? "The YAML does not parse: fix it below." : "The form edits NetworkPolicy and CiliumNetworkPolicy; edit this one as YAML."}</p>}
            <label class="field yaml"><span>YAML</span>
              <textarea data-testid="yaml" spellcheck={false} value={draft.yaml} onInput={(e) => update(current, e.currentTarget.value)} rows={16} />
            </label>
            {parseError && <div class="field-error">{parseError}</div>}
            <FieldErrors problems={unplaced.map((p) => ({ ...p, message: p.field ? `${p.field}: ${p.message}` : p.message }))} />
            <button class="small danger" data-testid="remove-draft" onClick={() => remove(current)}>remove draft</button>
          </div>
        )}
      </div>
      <div class="delta">
        <div class="row">
          <button data-testid="whatif" disabled={!drafts.length || problems.length || busy} onClick={whatif}>What if? (delta against live)</button>
          <button data-testid="apply" disabled={!drafts.length || problems.length || busy || !info?.allow_apply}
            title={info?.allow_apply ? "apply every draft to the agent" : "read-only: start with axoneme ui --allow-apply"} onClick={apply}>Apply {drafts.length} polic{drafts.length === 1 ? "y" : "ies"}</button>
        </div>
        <p class="muted" data-testid="validity">{problems.length ? `${problems.length} problem${problems.length > 1 ? "s" : ""}: fix them to see the delta` : drafts.length ? "valid" : ""}</p>
        {message && <div class={message.error ? "error" : "ok"} data-testid="apply-result">{message.error || message.ok}</div>}
        {delta && <Delta delta={delta} />}
      </div>
    </div>
  );
}

const why = (side) => `${side.verdict} (${side.reason}${side.rules && side.rules.length ? `: ${side.rules.join(", ")}` : ""})`;
const sideWhy = (t) => t && `egress ${why(t.egress)}; ingress ${why(t.ingress)}`;
const MAX_ROWS = 60;

function Delta({ delta }) {
  const s = delta.summary;
  const flips = (delta.flows && delta.flows.flips) || [];
  return (
    <div data-testid="delta">
      <h3>What changes</h3>
      <p data-testid="delta-summary">
        Observed traffic: <b>{flips.length}</b> of {s.observed_connections} connections flip
        {" · "}truth table: <b>{s.flips}</b> of {delta.probes} probes flip ({s.allowed_to_denied} allowed → denied, {s.denied_to_allowed} denied → allowed)
      </p>
      <h4>Observed flows</h4>
      {flips.length ? (
        <table class="flows" data-testid="delta-flows">
          <thead><tr><th>from → to</th><th>port</th><th>was</th><th>change</th><th>why</th></tr></thead>
          <tbody>
            {flips.map((f) => (
              <tr>
                <td>{f.from} → {f.to}</td><td>{f.port}/{f.protocol}</td>
                <td><span class="verdict" style={{ background: VERDICT_COLOURS[f.observed] || "#607d8b" }}>{f.observed}</span> ×{f.flows}</td>
                <td class={f.change === "would drop" ? "bad" : "good"}>{f.change}</td>
                <td class="muted">{sideWhy(f.after_trace)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : <p class="good" data-testid="delta-no-flow-flips">no observed flow flips</p>}
      <h4>Pod pairs and ports (truth table)</h4>
      {delta.flips.length ? (
        <table class="flows" data-testid="delta-probes">
          <thead><tr><th>from → to</th><th>port</th><th>before → after</th><th>why (after)</th></tr></thead>
          <tbody>
            {delta.flips.slice(0, MAX_ROWS).map((f) => (
              <tr>
                <td>{f.from} → {f.to}</td><td>{f.any_other_port ? "any other" : `${f.port}/${f.protocol}`}</td>
                <td class={f.after === "denied" ? "bad" : "good"}>{f.before} → {f.after}</td>
                <td class="muted">{sideWhy(f.after_trace)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : <p class="good">nothing flips</p>}
      {delta.flips.length > MAX_ROWS && <p class="muted">… and {delta.flips.length - MAX_ROWS} more</p>}
    </div>
  );
}
