// The queue through bluesky-httpserver's REST API: status polled (its status WebSocket
// takes only an Authorization header, which a browser cannot set on a WebSocket), the
// queue and history fetched when their uids change, the console as a streaming GET.
import { useCallback, useEffect, useRef, useState } from "react";
import type { AppConfig } from "../config";
import { Api, ApiError, SessionExpired, Unreachable } from "../net/httpserver";
import { appendConsole, splitConsoleStream } from "./console";
import type { Item, PlanDescription } from "./plans";

export interface QueueItem {
  item_uid?: string;
  name?: string;
  args?: unknown[];
  kwargs?: Record<string, unknown>;
  user?: string;
  result?: { exit_status?: string; msg?: string };
}

export interface QueueStatus {
  manager_state?: string;
  re_state?: string | null;
  worker_environment_exists?: boolean;
  items_in_queue?: number;
  items_in_history?: number;
  running_item_uid?: string | null;
  plan_queue_uid?: string;
  plan_history_uid?: string;
  queue_stop_pending?: boolean;
}

export interface QueueApi {
  /** "" when httpserver answers; otherwise why not ("queue server unreachable ..."). */
  problem: string;
  status: QueueStatus | null;
  queue: QueueItem[];
  running: QueueItem | null;
  history: QueueItem[];
  plans: Record<string, PlanDescription>;
  console: string;
  /** Run a queue command; resolves to "" or httpserver's reason. */
  command(path: string, body?: unknown): Promise<string>;
  add(item: Item): Promise<string>;
}

const CONSOLE_LINES = 500;

export function useQueue(cfg: AppConfig, apiKey: string, onExpired: (why: string) => void): QueueApi {
  const api = useRef(new Api(cfg, apiKey));
  const [problem, setProblem] = useState("");
  const [status, setStatus] = useState<QueueStatus | null>(null);
  const [queue, setQueue] = useState<QueueItem[]>([]);
  const [running, setRunning] = useState<QueueItem | null>(null);
  const [history, setHistory] = useState<QueueItem[]>([]);
  const [plans, setPlans] = useState<Record<string, PlanDescription>>({});
  const [consoleText, setConsole] = useState("");
  const expired = useRef(onExpired);
  expired.current = onExpired;

  const failed = useCallback((err: unknown): string => {
    if (err instanceof SessionExpired) {
      expired.current(`Your session has ended (${err.detail}). Please log in again.`);
      return err.detail;
    }
    if (err instanceof Unreachable) {
      setProblem(err.message);
      return err.message;
    }
    if (err instanceof ApiError) {
      if (err.status === 408) setProblem(`RE Manager not responding (${err.detail})`);
      return err.detail;
    }
    return String(err);
  }, []);

  useEffect(() => {
    api.current = new Api(cfg, apiKey);
    let stop = false;
    let seen = { queue: "", history: "", plans: false };
    const poll = async () => {
      try {
        const s = await api.current.get("/status") as QueueStatus;
        if (stop) return;
        setStatus(s);
        setProblem("");
        if (s.plan_queue_uid !== seen.queue) {
          const q = await api.current.get("/queue/get") as { items?: QueueItem[]; running_item?: QueueItem };
          seen = { ...seen, queue: s.plan_queue_uid ?? "" };
          setQueue(q.items ?? []);
          setRunning(q.running_item && Object.keys(q.running_item).length ? q.running_item : null);
        }
        if (s.plan_history_uid !== seen.history) {
          const h = await api.current.get("/history/get") as { items?: QueueItem[] };
          seen = { ...seen, history: s.plan_history_uid ?? "" };
          setHistory([...(h.items ?? [])].reverse());
        }
        if (!seen.plans) {
          const p = await api.current.get("/plans/allowed") as { plans_allowed?: Record<string, PlanDescription> };
          seen = { ...seen, plans: true };
          setPlans(p.plans_allowed ?? {});
        }
      } catch (err) {
        if (!stop) {
          failed(err);
          setStatus(null);
          seen = { queue: "", history: "", plans: seen.plans };
        }
      }
    };
    void poll();
    const timer = setInterval(poll, cfg.statusPollMs);
    return () => {
      stop = true;
      clearInterval(timer);
    };
  }, [cfg, apiKey, failed]);

  // Console output: the last lines, then the stream; reconnect after a pause if it ends.
  useEffect(() => {
    const abort = new AbortController();
    let timer: ReturnType<typeof setTimeout> | null = null;
    const follow = async () => {
      try {
        const last = await api.current.get("/console_output") as { text?: string };
        setConsole(appendConsole("", last.text ?? "", CONSOLE_LINES));
        const body = await api.current.stream("/stream_console_output", abort.signal);
        const reader = body.getReader();
        const decoder = new TextDecoder();
        let rest = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const split = splitConsoleStream(rest + decoder.decode(value, { stream: true }));
          rest = split.rest;
          const text = split.messages.map((m) => m.msg).join("");
          if (text) setConsole((c) => appendConsole(c, text, CONSOLE_LINES));
        }
      } catch (err) {
        if (abort.signal.aborted) return;
        if (err instanceof SessionExpired) return;   // the status poll reports it
      }
      if (!abort.signal.aborted) timer = setTimeout(follow, 3000);
    };
    void follow();
    return () => {
      abort.abort();
      if (timer !== null) clearTimeout(timer);
    };
  }, [cfg, apiKey]);

  const command = useCallback(async (path: string, body: unknown = {}) => {
    try {
      await api.current.post(path, body);
      return "";
    } catch (err) {
      return failed(err);
    }
  }, [failed]);

  const add = useCallback((item: Item) => command("/queue/item/add", { item }), [command]);

  return { problem, status, queue, running, history, plans, console: consoleText, command, add };
}
