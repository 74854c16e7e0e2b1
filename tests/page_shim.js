// Runs the script of an example web page (clients/websocket/lock-panel.html) in node, as a
// browser would: the page's own code, node's WebSocket (node >= 20 with
// --experimental-websocket, or >= 22), a minimal DOM of the elements it uses by id.
//   node --experimental-websocket page_shim.js PAGE.html "?ows=ws://...&lock=P&user=u"
// stdin, one command a line: `set ID VALUE` (an input's value), `click ID` (its onclick).
// stdout: the page as JSON on every change: what it shows and whether it renews a lease.
"use strict";
const fs = require("fs");
const readline = require("readline");
const vm = require("vm");

const [page, search] = process.argv.slice(2);
if (typeof WebSocket === "undefined") {
  console.error(`node ${process.version} has no WebSocket: node >= 20 with ` +
                "--experimental-websocket (or >= 22) is needed");
  process.exit(2);
}
const html = fs.readFileSync(page, "utf8");
const script = html.slice(html.indexOf("<script>") + 8, html.lastIndexOf("</script>"));
const elements = {};
global.document = {
  getElementById: (id) => elements[id] ||
    (elements[id] = {id, value: "", textContent: "", className: "", disabled: false}),
};
global.location = {search, hostname: "127.0.0.1"};
vm.runInThisContext(script, {filename: page});

const el = (id) => document.getElementById(id);
let last = "";
setInterval(() => {
  const view = JSON.stringify({
    state: el("state").textContent, holder: el("holder").textContent,
    message: el("message").textContent, result: el("result").textContent,
    release_enabled: !el("release").disabled, take_enabled: !el("take").disabled,
    renewing: vm.runInThisContext("renewTimer !== null"),
    hold: vm.runInThisContext("hold"),
  });
  if (view !== last) { console.log(view); last = view; }
}, 50);

readline.createInterface({input: process.stdin}).on("line", (line) => {
  const [verb, id, ...rest] = line.split(" ");
  if (verb === "set") el(id).value = rest.join(" ");
  else if (verb === "click") el(id).onclick();
  else console.error(`page_shim: unknown command ${JSON.stringify(line)}`);
}).on("close", () => process.exit(0));
