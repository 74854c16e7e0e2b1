// httpserver's answers as the page must read them (recorded shapes of bluesky-httpserver
// 0.0.14 and of the nginx in front of it; a stub fetch plays them back).
import { describe, expect, it } from "vitest";
import { DEFAULT_CONFIG } from "../config";
import { Api, ApiError, SessionExpired, Unreachable, detailText, login } from "./httpserver";

function answering(...replies: [number, unknown][]): typeof fetch {
  const queue = [...replies];
  return (async () => {
    const [status, body] = queue.shift()!;
    return new Response(typeof body === "string" ? body : JSON.stringify(body), { status });
  }) as typeof fetch;
}

describe("httpserver client", () => {
  it("logs in: provider token, then an API key, then who and which roles", async () => {
    const calls: [string, RequestInit | undefined][] = [];
    const replies: [number, unknown][] = [[200, { access_token: "T" }], [200, { secret: "abcd1234ef" }],
      [200, { identities: [{ id: "alice", provider: "local" }] }], [200, { roles: ["staff"], scopes: ["read:status"] }]];
    const fetcher = (async (url: string, init?: RequestInit) => {
      calls.push([url, init]);
      const [status, body] = replies.shift()!;
      return new Response(JSON.stringify(body), { status });
    }) as typeof fetch;
    const cfg = { ...DEFAULT_CONFIG, authProvider: "local" };
    expect(await login(cfg, "alice", "pw", fetcher)).toEqual(
      { user: "alice", roles: ["staff"], scopes: ["read:status"], apiKey: "abcd1234ef" });
    expect(calls.map((c) => c[0])).toEqual(["api/auth/provider/local/token", "api/auth/apikey",
                                             "api/auth/whoami", "api/auth/scopes"]);
    expect(String(calls[0][1]?.body)).toBe("username=alice&password=pw");
    expect(calls[2][1]?.headers).toEqual({ Authorization: "ApiKey abcd1234ef" });
  });

  it("a wrong password says so", async () => {
    const err = await login(DEFAULT_CONFIG, "alice", "bad",
                            answering([401, { detail: "Incorrect username or password" }])).catch((e) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect(err).not.toBeInstanceOf(SessionExpired);
    expect(err.detail).toBe("Login failed: Incorrect username or password");
  });

  it("tells unreachable, expired and refused apart", async () => {
    const api = (status: number, body: unknown) => new Api(DEFAULT_CONFIG, "k", answering([status, body]));
    await expect(api(502, { detail: "queue server unreachable: bluesky-httpserver does not answer behind nginx" })
      .get("/status")).rejects.toThrow(/^queue server unreachable: bluesky-httpserver does not answer/);
    await expect(api(501, "<html>Unsupported method</html>").get("/status")).rejects.toBeInstanceOf(Unreachable);
    await expect(api(401, { detail: "Invalid API key" }).get("/status")).rejects.toBeInstanceOf(SessionExpired);
    const refused = await api(400, { detail: "Plan validation failed: num: value is not a valid integer" })
      .post("/queue/item/add", {}).catch((e: ApiError) => e) as ApiError;
    expect(refused).toBeInstanceOf(ApiError);
    expect(refused.detail).toBe("Plan validation failed: num: value is not a valid integer");
    const failed = await api(200, { success: false, msg: "Failed to start the queue: queue is empty" })
      .post("/queue/start").catch((e: ApiError) => e) as ApiError;
    expect(failed.detail).toBe("Failed to start the queue: queue is empty");
    const unfetchable = new Api(DEFAULT_CONFIG, "k", (async () => { throw new TypeError("Failed to fetch"); }) as typeof fetch);
    await expect(unfetchable.get("/status")).rejects.toThrow("queue server unreachable (Failed to fetch)");
  });

  it("reads FastAPI validation details", () => {
    expect(detailText({ detail: [{ loc: ["body", "item"], msg: "field required" }] }, "x"))
      .toBe("body.item: field required");
  });
});
