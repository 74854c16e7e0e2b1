// Every URL, prefix and name the page depends on, in one place, so the page follows the
// serving stack's choices (nginx routes, httpserver provider, PV prefixes) without code
// changes. All URLs are relative: the page is served by the same nginx as the services.
//
// Defaults below; a deployment (or a test) overrides any of them at run time with a
// `config.json` next to index.html (same keys, all optional). See web/README.md.

export interface DeviceConfig {
  /** ophyd-websocket device name (clients/startup/10-devices.py). */
  name: string;
  kind: "motor" | "shutter" | "detector" | "beam";
  label: string;
}

export interface AppConfig {
  /** bluesky-httpserver's API root, as nginx proxies it. */
  apiBase: string;
  /** httpserver's authentication provider (`POST {apiBase}/auth/provider/<p>/token`). */
  authProvider: string;
  /** Lifetime of the API key the page asks for at login (seconds). */
  sessionSeconds: number;
  /**
   * Where nginx serves ophyd-websocket (its `/api/v1/...` routes below it). `{user}` is
   * replaced by the logged-in user's name, for a stack that runs one seat per web user.
   */
  owsBase: string;
  /**
   * How the page proves who it is on ophyd-websocket's WebSockets, which nginx checks
   * with httpserver: "cookie" sets `bluesky_httpserver_api_key` (Path = owsBase only, so
   * httpserver's own routes never see it and its CSRF check does not apply), "query"
   * appends `?api_key=`, "both" does both.
   */
  owsAuth: "cookie" | "query" | "both";
  /** Name of the cookie httpserver (and so nginx's auth check) reads an API key from. */
  apiKeyCookie: string;
  /** Lock IOC prefix ($(P) of docs/pv-interface.md). */
  lockPrefix: string;
  /** Device PV prefix (BEAMLINE_PREFIX), for the never-gated Stop PVs. */
  beamlinePrefix: string;
  /** Lock session of a web user: `web:<user>` (the seat's LOCK_SESSION). */
  sessionPrefix: string;
  /** The queue's lock session (the RE worker's guard), shown as "bluesky queue". */
  queueSession: string;
  /** Seconds a Take asks for; the keep-alive renews every lease/3 while the tab is open. */
  defaultLease: number;
  /** Whether the seat writes while the lock is Free (its LOCK_ALLOW_FREE_WRITES). */
  allowFreeWrites: boolean;
  /** httpserver roles that see the operator commands (ForceRelease, Disable, Enable). */
  operatorRoles: string[];
  /**
   * Seconds ophyd-websocket waits for a device move before answering. Its device `set`
   * blocks the whole server while it waits, so a short wait keeps Stop responsive; a
   * longer move is then followed on its readback.
   */
  moveWaitSeconds: number;
  /** Period of the queue status poll (ms). */
  statusPollMs: number;
  devices: DeviceConfig[];
}

export const DEFAULT_CONFIG: AppConfig = {
  apiBase: "api",
  authProvider: "pam",
  sessionSeconds: 8 * 3600,
  owsBase: "ophyd",
  owsAuth: "cookie",
  apiKeyCookie: "bluesky_httpserver_api_key",
  lockPrefix: "BL:LOCK:",
  beamlinePrefix: "BL:",
  sessionPrefix: "web:",
  queueSession: "queue",
  defaultLease: 300,
  allowFreeWrites: false,
  operatorRoles: ["operator", "admin"],
  moveWaitSeconds: 1,
  statusPollMs: 1000,
  devices: [
    { name: "shutter", kind: "shutter", label: "Photon shutter" },
    { name: "m1", kind: "motor", label: "Motor m1" },
    { name: "m2", kind: "motor", label: "Motor m2" },
    { name: "det", kind: "detector", label: "Detector" },
    { name: "beam", kind: "beam", label: "Beam" },
  ],
};

/** Merge a run-time override over the defaults, keeping only known keys of the right type. */
export function mergeConfig(base: AppConfig, override: unknown): AppConfig {
  if (override === null || typeof override !== "object" || Array.isArray(override)) return base;
  const out: AppConfig = { ...base };
  const record = override as Record<string, unknown>;
  for (const key of Object.keys(base) as (keyof AppConfig)[]) {
    if (!(key in record)) continue;
    const value = record[key];
    const want = base[key];
    const ok = Array.isArray(want) ? Array.isArray(value) : typeof value === typeof want;
    if (!ok) throw new Error(`config.json: "${key}" must be ${Array.isArray(want) ? "a list" : "a " + typeof want}`);
    (out as unknown as Record<string, unknown>)[key] = value;
  }
  return out;
}

/** Load `config.json` beside the page; a missing file means the defaults. */
export async function loadConfig(fetcher: typeof fetch = fetch): Promise<AppConfig> {
  let response: Response;
  try {
    response = await fetcher("config.json", { cache: "no-store" });
  } catch {
    return DEFAULT_CONFIG;
  }
  if (response.status === 404 || !response.ok) return DEFAULT_CONFIG;
  return mergeConfig(DEFAULT_CONFIG, await response.json());
}

/** A path under apiBase, e.g. apiUrl(cfg, "/queue/get"). Relative to the page. */
export function apiUrl(cfg: AppConfig, path: string): string {
  return joinPath(cfg.apiBase, path);
}

/** The ophyd-websocket base for this user (owsBase with `{user}` filled in). */
export function owsPath(cfg: AppConfig, user: string): string {
  return cfg.owsBase.replace("{user}", encodeURIComponent(user));
}

/** Absolute ws(s):// URL of an ophyd-websocket socket, derived from the page's own URL. */
export function owsSocketUrl(cfg: AppConfig, user: string, socket: "pv-socket" | "device-socket",
                             pageUrl: string, apiKey: string): string {
  const url = new URL(joinPath(owsPath(cfg, user), `/api/v1/${socket}`), pageUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (cfg.owsAuth !== "cookie") url.searchParams.set("api_key", apiKey);
  return url.toString();
}

/** The cookie (Path limited to the ophyd-websocket routes) that carries the API key. */
export function owsCookie(cfg: AppConfig, user: string, apiKey: string | null,
                          pageUrl: string): string | null {
  if (cfg.owsAuth === "query") return null;
  const page = new URL(pageUrl);
  const path = new URL(joinPath(owsPath(cfg, user), "/"), pageUrl).pathname;
  const secure = page.protocol === "https:" ? "; Secure" : "";
  if (apiKey === null) {
    return `${cfg.apiKeyCookie}=; Path=${path}; Max-Age=0; SameSite=Strict${secure}`;
  }
  return `${cfg.apiKeyCookie}=${apiKey}; Path=${path}; Max-Age=${cfg.sessionSeconds}` +
         `; SameSite=Strict${secure}`;
}

function joinPath(base: string, path: string): string {
  return base.replace(/\/+$/, "") + "/" + path.replace(/^\/+/, "");
}
