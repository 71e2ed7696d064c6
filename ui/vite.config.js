// Built by scripts/bootstrap (npm ci && npm run build) into the agent package's
// git-ignored static/ directory, which `axoneme ui` serves and the wheel ships.
import { defineConfig } from "vite";

export default defineConfig({
  base: "./",
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    outDir: "../packages/agent/src/axoneme/agent/ui/static",
    emptyOutDir: true,
    chunkSizeWarningLimit: 2000,
    sourcemap: false,
  },
  server: { proxy: { "/api": "http://127.0.0.1:12000" } },
});
