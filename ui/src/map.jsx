// The live service map: workloads by identity (nodes), flows between them
// (edges, coloured by their worst verdict), laid out by dagre; a click on an
// edge lists its flows with the policy that decided each.
import { useEffect, useRef, useState } from "preact/hooks";
import cytoscape from "cytoscape";
import dagre from "cytoscape-dagre";
import { api } from "./api.js";

cytoscape.use(dagre);

export const VERDICT_COLOURS = {
  FORWARDED: "#2e7d32",
  REDIRECTED: "#1565c0",
  AUDIT: "#ef6c00",
  DROPPED: "#c62828",
};

const STYLE = [
  {
    selector: "node",
    style: {
      shape: "round-rectangle",
      "background-color": "#eceff1",
      "border-color": "#546e7a",
      "border-width": 1.5,
      label: "data(display)",
      "text-wrap": "wrap",
      "text-valign": "center",
      "font-size": 12,
      "font-family": "DejaVu Sans, sans-serif",
      width: 140,
      height: 48,
    },
  },
  { selector: "node[kind = 'reserved'], node[kind = 'address']", style: { "background-color": "#fff8e1", "border-style": "dashed" } },
  {
    selector: "edge",
    style: {
      width: 3,
      "curve-style": "bezier",
      "target-arrow-shape": "triangle",
      "line-color": "data(colour)",
      "target-arrow-color": "data(colour)",
      label: "data(display)",
      "font-size": 10,
      "font-family": "DejaVu Sans, sans-serif",
      "text-background-color": "#ffffff",
      "text-background-opacity": 0.85,
      "text-background-padding": 2,
      "text-wrap": "wrap",
      "text-rotation": "autorotate",
    },
  },
  { selector: "edge:selected", style: { width: 6 } },
];

function nodeElement(n) {
  const ns = n.namespace ? `${n.namespace}\n` : "";
  const pods = n.pods.length > 1 ? ` (${n.pods.length} pods)` : "";
  const id = n.identity != null ? ` #${n.identity}` : "";
  return { group: "nodes", data: { id: n.id, kind: n.kind, display: `${ns}${n.label}${pods}${id}`, raw: n } };
}

function edgeElement(e, labels) {
  const counts = Object.entries(e.counts).filter(([, c]) => c > 0).map(([v, c]) => `${v.toLowerCase()} ${c}`);
  return {
    group: "edges",
    data: {
      id: e.id, source: e.source, target: e.target, verdict: e.verdict,
      colour: VERDICT_COLOURS[e.verdict] || "#607d8b",
      display: `${e.ports.join(", ")}\n${counts.join(" · ")}`,
      raw: { ...e, source_label: labels.get(e.source) || e.source, target_label: labels.get(e.target) || e.target },
    },
  };
}

export function MapView({ windowSecs }) {
  const box = useRef(null);
  const cyRef = useRef(null);
  const [error, setError] = useState(null);
  const [selected, setSelected] = useState(null);
  const [flows, setFlows] = useState(null);
  const [stamp, setStamp] = useState(null);

  useEffect(() => {
    const cy = cytoscape({ container: box.current, style: STYLE, wheelSensitivity: 0.3, minZoom: 0.3, maxZoom: 1.6 });
    cyRef.current = cy;
    window.axonemeUI = Object.assign(window.axonemeUI || {}, { cy });
    cy.on("tap", "edge", (evt) => setSelected(evt.target.data("raw")));
    cy.on("tap", (evt) => { if (evt.target === cy) setSelected(null); });
    return () => cy.destroy();
  }, []);

  useEffect(() => {
    let stop = false;
    let timer = null;
    const load = async () => {
      try {
        const m = await api.map(windowSecs);
        if (stop) return;
        update(cyRef.current, m);
        setError(null);
        setStamp(new Date().toLocaleTimeString());
      } catch (e) {
        if (!stop) setError(e.message);
      }
      if (!stop) timer = setTimeout(load, 2000);
    };
    load();
    return () => { stop = true; clearTimeout(timer); };
  }, [windowSecs]);

  useEffect(() => {
    if (!selected) { setFlows(null); return; }
    let stop = false;
    api.edge(selected.source, selected.target, windowSecs)
      .then((r) => { if (!stop) setFlows(r.flows); })
      .catch((e) => { if (!stop) setError(e.message); });
    return () => { stop = true; };
  }, [selected, stamp]);

  return (
    <div class="map-layout">
      <div class="map-main">
        <div class="toolbar">
          <span class="legend">
            {Object.entries(VERDICT_COLOURS).map(([v, c]) => (
              <span class="legend-item"><span class="swatch" style={{ background: c }} />{v.toLowerCase()}</span>
            ))}
          </span>
          <span class="muted" data-testid="map-stamp">{stamp ? `updated ${stamp}` : "loading…"}</span>
        </div>
        {error && <div class="error" data-testid="map-error">{error}</div>}
        <div class="cy" ref={box} data-testid="service-map" />
      </div>
      <aside class="side" data-testid="edge-panel">
        {selected ? <EdgeFlows edge={selected} flows={flows} /> :
          <p class="muted">Click an edge to see its flows and the policy that decided each.</p>}
      </aside>
    </div>
  );
}

function update(cy, m) {
  const want = new Map();
  const labels = new Map(m.nodes.map((n) => [n.id, n.namespace && n.kind === "workload" ? `${n.namespace}/${n.label}` : n.label]));
  for (const n of m.nodes) want.set(n.id, nodeElement(n));
  for (const e of m.edges) want.set(e.id, edgeElement(e, labels));
  // a node or an edge added or removed lays the map out again (dagre ranks by the edges, and
  // keeps a long edge off the nodes between its ends); new counts only restyle
  let changed = false;
  cy.batch(() => {
    cy.elements().forEach((el) => {
      if (!want.has(el.id())) { cy.remove(el); changed = true; }
    });
    for (const [id, el] of want) {
      const have = cy.getElementById(id);
      if (have.empty()) { cy.add(el); changed = true; } else { have.data(el.data); }
    }
  });
  if (changed) {
    cy.layout({ name: "dagre", rankDir: "LR", nodeSep: 50, rankSep: 90, edgeSep: 30, animate: false, fit: true, padding: 30 }).run();
  }
}

function EdgeFlows({ edge, flows }) {
  return (
    <div>
      <h3 data-testid="edge-title">{edge.source_label} → {edge.target_label}</h3>
      <p class="muted">{edge.ports.join(", ")} · last {edge.last}</p>
      {flows == null ? <p class="muted">loading…</p> : (
        <table class="flows" data-testid="edge-flows">
          <thead><tr><th>time</th><th>verdict</th><th>from → to</th><th>port</th><th>deciding policy</th></tr></thead>
          <tbody>
            {flows.map((f) => (
              <tr>
                <td>{(f.time || "").slice(11, 19)}</td>
                <td><span class="verdict" style={{ background: VERDICT_COLOURS[f.verdict] || "#607d8b" }}>{f.verdict}</span></td>
                <td>{f.source} → {f.destination} <span class="muted">{(f.direction || "").toLowerCase()}</span></td>
                <td>{f.port != null ? `${f.port}/${f.protocol}` : f.protocol}</td>
                <td data-testid="flow-policy">{f.policy}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
