// The UI server's JSON API (packages/agent/src/axoneme/agent/ui/_server.py).

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export const api = {
  info: () => call("GET", "api/info"),
  map: (window) => call("GET", `api/map?window=${window}`),
  edge: (source, target, window) =>
    call("GET", `api/edge?source=${encodeURIComponent(source)}&target=${encodeURIComponent(target)}&window=${window}`),
  policies: () => call("GET", "api/policies"),
  validate: (yaml) => call("POST", "api/validate", { yaml }),
  whatif: (yaml, window) => call("POST", "api/whatif", { yaml, window }),
  recommend: (kind, window) => call("GET", `api/recommend?kind=${kind}&window=${window}`),
  apply: (yaml) => call("POST", "api/apply", { yaml }),
};
