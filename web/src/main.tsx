import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
// finch.css first (it resets the browser defaults), then the page's own styles.
import "@blueskyproject/finch/style.css";
import "./styles.css";
import { App } from "./App";
import { loadConfig } from "./config";

const root = createRoot(document.getElementById("root")!);
loadConfig().then(
  (cfg) => root.render(<StrictMode><App cfg={cfg} /></StrictMode>),
  (err) => root.render(<p className="error" role="alert">The page's configuration is broken: {String(err)}</p>),
);
