// axoneme's web UI: a live service map, a policy editor with the what-if
// delta before apply, and recommendations as editable drafts.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api } from "./api.js";
import { MapView } from "./map.jsx";
import { EditorView } from "./editor.jsx";
import { RecommendView } from "./recommend.jsx";
import "./style.css";

const WINDOWS = [[300, "5 min"], [900, "15 min"], [3600, "1 hour"], [21600, "6 hours"]];

function App() {
  const [tab, setTab] = useState("map");
  const [info, setInfo] = useState(null);
  const [error, setError] = useState(null);
  const [windowSecs, setWindowSecs] = useState(900);
  const [drafts, setDrafts] = useState([]);
  const [current, setCurrent] = useState(0);

  useEffect(() => {
    api.info().then(setInfo).catch((e) => setError(e.message));
  }, []);

  const use = (texts) => {
    setDrafts([...drafts, ...texts.map((yaml) => ({ yaml }))]);
    setCurrent(drafts.length);
    setTab("editor");
  };
  const tabs = [["map", "Service map"], ["editor", `Policy editor${drafts.length ? ` (${drafts.length})` : ""}`], ["recommend", "Recommendations"]];
  return (
    <div class="app">
      <header>
        <b class="brand">axoneme</b>
        <nav>
          {tabs.map(([id, label]) => (
            <button class={tab === id ? "active" : ""} data-testid={`tab-${id}`} onClick={() => setTab(id)}>{label}</button>
          ))}
        </nav>
        <span class="spacer" />
        <label class="window">flows of the last{" "}
          <select value={windowSecs} data-testid="window" onChange={(e) => setWindowSecs(Number(e.currentTarget.value))}>
            {WINDOWS.map(([s, l]) => <option value={s}>{l}</option>)}
          </select>
        </label>
        {info && <span class="muted" data-testid="agent-info">{info.datapath} · revision {info.policy_revision} · {info.allow_apply ? "apply allowed" : "read-only"}</span>}
      </header>
      {error && <div class="error">{error}</div>}
      <main>
        <div style={{ display: tab === "map" ? "block" : "none" }}><MapView windowSecs={windowSecs} /></div>
        {tab === "editor" && <EditorView drafts={drafts} setDrafts={setDrafts} current={current} setCurrent={setCurrent} info={info} windowSecs={windowSecs} />}
        {tab === "recommend" && <RecommendView windowSecs={windowSecs} onUse={use} />}
      </main>
    </div>
  );
}

render(<App />, document.getElementById("app"));
