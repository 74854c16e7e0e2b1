import { describe, expect, it } from "vitest";
import { appendConsole, splitConsoleStream } from "./console";

describe("console stream", () => {
  it("splits back-to-back JSON objects, whatever the chunking", () => {
    const stream = '{"time": 1.5, "msg": "Plan {count} started\\n"}{"time": 2, "msg": "quote \\" } brace\\n"}';
    for (let cut = 0; cut <= stream.length; cut++) {
      const a = splitConsoleStream(stream.slice(0, cut));
      const b = splitConsoleStream(a.rest + stream.slice(cut));
      expect([...a.messages, ...b.messages].map((m) => m.msg), `cut ${cut}`)
        .toEqual(["Plan {count} started\n", 'quote " } brace\n']);
      expect(b.rest).toBe("");
    }
  });

  it("keeps the last lines", () => {
    expect(appendConsole("a\nb\n", "c\nd\n", 2)).toBe("c\nd\n");
    expect(appendConsole("a\nb", "c\n", 5)).toBe("a\nbc\n");
    expect(appendConsole("", "x", 3)).toBe("x");
  });
});
