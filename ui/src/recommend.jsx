// Recommendations (`policy recommend`'s): least-privilege policies from the
// observed flows, each an editable draft that can go to the editor.
import { useState } from "preact/hooks";
import { api } from "./api.js";

export function RecommendView({ windowSecs, onUse }) {
  const [kind, setKind] = useState("np");
  const [result, setResult] = useState(null);
  const [texts, setTexts] = useState([]);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const load = async () => {
    setBusy(true); setError(null);
    try {
      const r = await api.recommend(kind, windowSecs);
      setResult(r); setTexts(r.drafts.map((d) => d.yaml));
    } catch (e) { setError(e.message); }
    setBusy(false);
  };
  return (
    <div class="recommend">
      <div class="row">
        <label class="field"><span>kind</span>
          <select value={kind} onChange={(e) => setKind(e.currentTarget.value)}>
            <option value="np">NetworkPolicy</option><option value="cnp">CiliumNetworkPolicy</option>
          </select>
        </label>
        <button data-testid="recommend" disabled={busy} onClick={load}>Recommend from observed flows</button>
        {result && result.drafts.length > 0 && (
          <button data-testid="use-all" onClick={() => onUse(texts)}>Add all {texts.length} to the editor</button>
        )}
      </div>
      {error && <div class="error">{error}</div>}
      {result && <p class="muted" data-testid="recommend-summary">{result.connections} forwarded connections observed; {result.drafts.length} policies</p>}
      {result && result.notes.map((n) => <p class="muted">note: {n}</p>)}
      <div class="cards">
        {result && result.drafts.map((d, i) => (
          <div class="card" data-testid={`recommendation-${i}`}>
            <h4>{d.kind} {d.namespace}/{d.name}</h4>
            <textarea spellcheck={false} rows={14} value={texts[i]} onInput={(e) => setTexts(texts.map((t, j) => (j === i ? e.currentTarget.value : t)))} />
            <button class="small" onClick={() => onUse([texts[i]])}>Add to the editor</button>
          </div>
        ))}
      </div>
    </div>
  );
}
