// httpserver's /api/stream_console_output sends JSON objects back to back with no
// separator ({"time": ..., "msg": "..."}{"time": ...}), split across reads at any byte.
// This splitter finds the object boundaries (braces outside strings). Pure.

export interface ConsoleMessage {
  time?: number;
  msg: string;
}

export interface Split {
  messages: ConsoleMessage[];
  /** The incomplete tail, to prepend to the next chunk. */
  rest: string;
}

export function splitConsoleStream(buffer: string): Split {
  const messages: ConsoleMessage[] = [];
  let depth = 0, inString = false, escaped = false, start = -1, consumed = 0;
  for (let i = 0; i < buffer.length; i++) {
    const c = buffer[i];
    if (inString) {
      if (escaped) escaped = false;
      else if (c === "\\") escaped = true;
      else if (c === '"') inString = false;
      continue;
    }
    if (c === '"') inString = true;
    else if (c === "{") {
      if (depth === 0) start = i;
      depth++;
    } else if (c === "}" && depth > 0) {
      depth--;
      if (depth === 0) {
        const text = buffer.slice(start, i + 1);
        consumed = i + 1;
        try {
          const obj = JSON.parse(text) as { msg?: unknown; time?: unknown };
          messages.push({ msg: typeof obj.msg === "string" ? obj.msg : "",
                          time: typeof obj.time === "number" ? obj.time : undefined });
        } catch {
          /* not one of httpserver's messages: skip it */
        }
      }
    } else if (depth === 0) {
      consumed = i + 1;        // whitespace between objects
    }
  }
  return { messages, rest: buffer.slice(consumed) };
}

/** Console text plus `more`, cut to its last `maxLines` lines. */
export function appendConsole(text: string, more: string, maxLines: number): string {
  const all = text + more;
  let cut = all.length, lines = 0;
  while (cut > 0) {
    const nl = all.lastIndexOf("\n", cut - 1);
    if (nl < 0) return all;
    if (nl < all.length - 1) lines++;
    if (lines >= maxLines) return all.slice(nl + 1);
    cut = nl;
  }
  return all;
}
