// bluesky-httpserver's REST API as the page uses it: login (provider token, then an API
// key), who am I, and authenticated GET/POST. The API key goes in the Authorization
// header, never in a cookie for these routes: httpserver applies a double-submit CSRF
// check to POSTs that carry its cookie, which a page cannot satisfy (the CSRF cookie is
// HttpOnly). Errors carry httpserver's own reason (`detail`).
import { apiUrl, type AppConfig } from "../config";

/** httpserver answered with an error; `detail` is its reason, verbatim. */
export class ApiError extends Error {
  constructor(public status: number, public detail: string) {
    super(detail);
  }
}

/** The API key is no longer accepted (expired or revoked): log in again. */
export class SessionExpired extends ApiError {}

/** No answer from httpserver (connection refused, nginx 502/503/504, a bare 5xx page). */
export class Unreachable extends Error {
  constructor(why: string) {
    super(why.startsWith("queue server unreachable") ? why : `queue server unreachable (${why})`);
  }
}

export interface Session {
  user: string;
  roles: string[];
  scopes: string[];
  apiKey: string;
}

type Fetch = typeof fetch;

/** FastAPI's `detail` (a string, or a list of validation errors) as one line. */
export function detailText(body: unknown, fallback: string): string {
  const detail = (body as { detail?: unknown } | null)?.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const item = d as { loc?: unknown[]; msg?: string };
      return item.loc ? `${item.loc.join(".")}: ${item.msg}` : String(item.msg ?? JSON.stringify(d));
    }).join("; ");
  }
  const msg = (body as { msg?: unknown } | null)?.msg;
  if (typeof msg === "string" && msg) return msg;
  return fallback;
}

async function call(fetcher: Fetch, url: string, init: RequestInit): Promise<unknown> {
  let response: Response;
  try {
    response = await fetcher(url, init);
  } catch (err) {
    throw new Unreachable(err instanceof Error ? err.message : String(err));
  }
  const text = await response.text();
  let body: unknown = null;
  let json = true;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    json = false;
    body = { detail: text.slice(0, 300) };
  }
  // nginx's answer for a dead upstream, or a server that is not httpserver at all.
  if ([502, 503, 504].includes(response.status) || (response.status >= 500 && !json)) {
    throw new Unreachable(json ? detailText(body, `HTTP ${response.status}`) : `HTTP ${response.status}`);
  }
  if (response.status === 401) {
    throw new SessionExpired(401, detailText(body, "not authenticated"));
  }
  if (!response.ok) {
    throw new ApiError(response.status, detailText(body, `HTTP ${response.status}`));
  }
  // The RE Manager's own refusals come back as 200 with success: false.
  const result = body as { success?: unknown } | null;
  if (result && result.success === false) throw new ApiError(200, detailText(body, "request failed"));
  return body;
}

/** Log in: the provider's token, then an API key of the session's lifetime. */
export async function login(cfg: AppConfig, username: string, password: string,
                            fetcher: Fetch = fetch): Promise<Session> {
  const form = new URLSearchParams({ username, password });
  let tokens: { access_token?: string };
  try {
    tokens = await call(fetcher, apiUrl(cfg, `/auth/provider/${cfg.authProvider}/token`),
                        { method: "POST", body: form }) as { access_token?: string };
  } catch (err) {
    if (err instanceof SessionExpired) throw new ApiError(401, `Login failed: ${err.detail}`);
    throw err;
  }
  const bearer = { Authorization: `Bearer ${tokens.access_token}`, "Content-Type": "application/json" };
  const key = await call(fetcher, apiUrl(cfg, "/auth/apikey"), {
    method: "POST", headers: bearer,
    body: JSON.stringify({ expires_in: cfg.sessionSeconds, note: "beamline-lock web page" }),
  }) as { secret?: string };
  if (!key.secret) throw new ApiError(500, "httpserver gave no API key");
  return whoami(cfg, key.secret, fetcher);
}

/** Who the API key belongs to, and their roles (for a page reload too). */
export async function whoami(cfg: AppConfig, apiKey: string, fetcher: Fetch = fetch): Promise<Session> {
  const headers = { Authorization: `ApiKey ${apiKey}` };
  const me = await call(fetcher, apiUrl(cfg, "/auth/whoami"), { headers }) as
    { identities?: { id: string; provider: string }[] } | null;
  const identity = me?.identities?.find((i) => i.provider === cfg.authProvider) ?? me?.identities?.[0];
  if (!identity) throw new SessionExpired(401, "httpserver does not know this session");
  const scopes = await call(fetcher, apiUrl(cfg, "/auth/scopes"), { headers }) as
    { roles?: string[]; scopes?: string[] };
  return { user: identity.id, roles: scopes.roles ?? [], scopes: scopes.scopes ?? [], apiKey };
}

/** Revoke the session's API key; failures are ignored (it expires anyway). */
export async function revoke(cfg: AppConfig, apiKey: string, fetcher: Fetch = fetch): Promise<void> {
  const url = apiUrl(cfg, `/auth/apikey?first_eight=${encodeURIComponent(apiKey.slice(0, 8))}`);
  try {
    await call(fetcher, url, { method: "DELETE", headers: { Authorization: `ApiKey ${apiKey}` } });
  } catch {
    /* the key expires by itself */
  }
}

/** Authenticated calls for one session. */
export class Api {
  constructor(private cfg: AppConfig, private apiKey: string, private fetcher: Fetch = fetch) {}

  get(path: string): Promise<unknown> {
    return call(this.fetcher, apiUrl(this.cfg, path),
                { headers: { Authorization: `ApiKey ${this.apiKey}` }, cache: "no-store" });
  }

  post(path: string, body: unknown = {}): Promise<unknown> {
    return call(this.fetcher, apiUrl(this.cfg, path), {
      method: "POST",
      headers: { Authorization: `ApiKey ${this.apiKey}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  /** A streaming GET (console output): the response body, read by the caller. */
  async stream(path: string, signal: AbortSignal): Promise<ReadableStream<Uint8Array>> {
    let response: Response;
    try {
      response = await this.fetcher(apiUrl(this.cfg, path),
        { headers: { Authorization: `ApiKey ${this.apiKey}` }, signal, cache: "no-store" });
    } catch (err) {
      throw new Unreachable(err instanceof Error ? err.message : String(err));
    }
    if (response.status === 401) throw new SessionExpired(401, "not authenticated");
    if (!response.ok || !response.body) throw new Unreachable(`HTTP ${response.status}`);
    return response.body;
  }
}
