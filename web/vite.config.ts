// Build: `npm ci && npm run build` writes web/dist, nginx's static root. Relative asset
// URLs (base "./") so the page works under any path nginx serves it from.
import { defineConfig } from "vitest/config";
import react from "@vitejs/plugin-react";

export default defineConfig({
  base: "./",
  plugins: [react()],
  // The beamline chunk carries @blueskyproject/finch whole (one module, not tree-shakable:
  // web/README.md), about 4.9 MB: warn only above that.
  build: { outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 5500 },
  // docs/pv-interface.json (the lock's ICD, generated from lock_ioc/contract.py) lives
  // one level up: the page takes its PV names from it.
  server: { fs: { allow: [".."] } },
  test: { environment: "node", include: ["src/**/*.test.ts"] },
});
