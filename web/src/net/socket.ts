// A WebSocket to ophyd-websocket that reconnects (1 s, 2 s, ... 10 s) until closed.
// It only moves JSON messages: what they mean is the caller's (pure) business.

export interface SocketHandlers {
  onOpen(): void;
  onMessage(msg: Record<string, unknown>): void;
  onClose(): void;
}

export class ReconnectingSocket {
  private ws: WebSocket | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private delay = 1000;
  private closed = false;

  constructor(private url: string, private handlers: SocketHandlers) {
    this.connect();
  }

  get open(): boolean {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  /** Send one JSON message; false if the socket is not open (nothing is queued). */
  send(msg: unknown): boolean {
    if (!this.open || this.ws === null) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  close(): void {
    this.closed = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.ws?.close();
  }

  private connect(): void {
    if (this.closed) return;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.delay = 1000;
      this.handlers.onOpen();
    };
    ws.onmessage = (event) => {
      let msg: unknown;
      try {
        msg = JSON.parse(String(event.data));
      } catch {
        return;
      }
      if (msg && typeof msg === "object" && !Array.isArray(msg)) {
        this.handlers.onMessage(msg as Record<string, unknown>);
      }
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.handlers.onClose();
      if (this.closed) return;
      this.timer = setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(10_000, this.delay * 2);
    };
  }
}
