import { describe, expect, it } from "vitest";
import { DEFAULT_CONFIG, apiUrl, loadConfig, mergeConfig, owsCookie, owsSocketUrl } from "./config";

describe("config", () => {
  it("builds every URL relative to the page", () => {
    const cfg = DEFAULT_CONFIG;
    expect(apiUrl(cfg, "/queue/get")).toBe("api/queue/get");
    expect(owsSocketUrl(cfg, "alice", "pv-socket", "https://bl.example/", "k1"))
      .toBe("wss://bl.example/ophyd/api/v1/pv-socket");
    expect(owsSocketUrl(cfg, "alice", "device-socket", "http://127.0.0.1:8080/x/index.html", "k1"))
      .toBe("ws://127.0.0.1:8080/x/ophyd/api/v1/device-socket");
  });

  it("follows a per-user seat prefix and query authentication", () => {
    const cfg = mergeConfig(DEFAULT_CONFIG, { owsBase: "/seats/{user}/", owsAuth: "query" });
    expect(owsSocketUrl(cfg, "bob", "pv-socket", "https://bl.example/", "abc"))
      .toBe("wss://bl.example/seats/bob/api/v1/pv-socket?api_key=abc");
    expect(owsCookie(cfg, "bob", "abc", "https://bl.example/")).toBeNull();
  });

  it("limits the API key cookie to the ophyd-websocket routes", () => {
    const cookie = owsCookie(DEFAULT_CONFIG, "alice", "abc", "https://bl.example/");
    expect(cookie).toBe("bluesky_httpserver_api_key=abc; Path=/ophyd/; Max-Age=28800; SameSite=Strict; Secure");
    expect(owsCookie(DEFAULT_CONFIG, "alice", null, "https://bl.example/"))
      .toBe("bluesky_httpserver_api_key=; Path=/ophyd/; Max-Age=0; SameSite=Strict; Secure");
  });

  it("rejects a config.json value of the wrong type, ignores unknown keys", () => {
    expect(() => mergeConfig(DEFAULT_CONFIG, { defaultLease: "300" })).toThrow(/defaultLease/);
    expect(mergeConfig(DEFAULT_CONFIG, { nope: 1 })).toEqual(DEFAULT_CONFIG);
  });

  it("uses the defaults when there is no config.json", async () => {
    const missing = async () => new Response("", { status: 404 });
    expect(await loadConfig(missing as typeof fetch)).toBe(DEFAULT_CONFIG);
    const some = async () => new Response(JSON.stringify({ lockPrefix: "TST:LOCK:" }));
    expect((await loadConfig(some as typeof fetch)).lockPrefix).toBe("TST:LOCK:");
  });
});
