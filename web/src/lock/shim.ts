// The web page's lock client (LockClient: store, keep-alive, socket wiring) run in node
// against a real ophyd-websocket seat, for tests/test_websocket.py. Not part of the page.
//   node --experimental-websocket shim.cjs WS_URL LOCK_PREFIX SESSION
// stdin, one command a line: `take LEASE NOTE...`, `release`, `renew`, `request LEASE
// NOTE...`, `withdraw`, `handover`.
// stdout: what the page would show, as JSON, on every change.
import * as readline from "node:readline";
import { LockClient } from "./client";
import { heldBy, heldText } from "./view";

const [url, prefix, session] = process.argv.slice(2);
if (typeof WebSocket === "undefined") {
  console.error(`node ${process.version} has no WebSocket: node >= 20 with --experimental-websocket`);
  process.exit(2);
}
const client = new LockClient({ url, prefix, session, lease: 300 });
const names = { sessionPrefix: "web:", queueSession: "queue" };

let last = "";
client.onChange = () => {
  const view = client.view;
  const holder = view.holder;
  const shown = JSON.stringify({
    state: view.state,
    owner: holder?.owner ?? null, session: holder?.session ?? null, note: holder?.note ?? null,
    holder: holder ? heldText(holder, names) : "",
    message: view.message,
    token: view.token,
    take_enabled: view.known && view.token !== null && !heldBy(view, session),
    release_enabled: heldBy(view, session),
    renewing: client.ka.hold !== null,
    hold: client.ka.hold ? { token: client.ka.hold.token } : null,
    outcome: client.ka.outcome?.kind ?? null,
    waiters: client.line.waiters.map((w) => `${w.who} ${w.session}`),
    place: client.line.place,
    requesting: client.req !== null,
  });
  if (shown !== last) {
    console.log(shown);
    last = shown;
  }
};

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const [verb, ...rest] = line.trim().split(" ");
  if (verb === "take") client.take(Number(rest[0]), rest.slice(1).join(" "));
  else if (verb === "release") client.release();
  else if (verb === "renew") client.renew();
  else if (verb === "request") client.request(Number(rest[0]), rest.slice(1).join(" "));
  else if (verb === "withdraw") client.withdraw();
  else if (verb === "handover") client.handover();
  else console.error(`shim: unknown command ${JSON.stringify(line)}`);
}).on("close", () => {
  client.close();
  process.exit(0);
});
