import { useEffect, useMemo, useRef, useState, type FormEvent } from "react";
import { itemText, planFields, planItem } from "../queue/plans";
import type { QueueApi, QueueItem } from "../queue/useQueue";
import { Action, Panel } from "./finch";

function Items({ id, label, items, empty }: { id: string; label: string; items: QueueItem[]; empty: string }) {
  return (
    <>
      <h3 id={`${id}-title`}>{label}</h3>
      {items.length === 0 ? <p className="muted" id={id}>{empty}</p> : (
        <ol className="items" id={id} aria-labelledby={`${id}-title`}>
          {items.map((item, i) => (
            <li key={item.item_uid ?? i}>
              <code>{itemText(item)}</code>
              {item.user && <span className="muted"> — {item.user}</span>}
              {item.result?.exit_status && (
                <span className={`exit exit-${item.result.exit_status}`}> {item.result.exit_status}</span>
              )}
            </li>
          ))}
        </ol>
      )}
    </>
  );
}

function AddPlan({ queue }: { queue: QueueApi }) {
  const names = useMemo(() => Object.keys(queue.plans).sort(), [queue.plans]);
  const [plan, setPlan] = useState("");
  const [texts, setTexts] = useState<Record<string, string>>({});
  const [result, setResult] = useState<{ ok: boolean; text: string } | null>(null);
  const chosen = queue.plans[plan || names[0]];
  const fields = chosen ? planFields(chosen) : [];

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    if (!chosen) return;
    const item = planItem(chosen, texts);
    setResult(null);
    const why = await queue.add(item);
    setResult(why ? { ok: false, text: why } : { ok: true, text: `Added ${itemText(item)}` });
  };

  return (
    <form className="add-plan" onSubmit={submit} aria-labelledby="add-plan-title">
      <h3 id="add-plan-title">Add a plan</h3>
      <div className="field">
        <label htmlFor="plan-name">Plan</label>
        <select id="plan-name" value={chosen?.name ?? ""} disabled={names.length === 0}
                onChange={(e) => { setPlan(e.target.value); setTexts({}); setResult(null); }}>
          {names.map((n) => <option key={n} value={n}>{n}</option>)}
        </select>
      </div>
      {chosen?.description && <p className="muted">{chosen.description.split("\n")[0]}</p>}
      {fields.map((field) => (
        <div className="field" key={field.name}>
          <label htmlFor={`param-${field.name}`}>{field.name}{field.required ? " *" : ""}</label>
          <input id={`param-${field.name}`} value={texts[field.name] ?? ""}
                 aria-describedby={`param-${field.name}-hint`}
                 onChange={(e) => setTexts({ ...texts, [field.name]: e.target.value })} />
          <span id={`param-${field.name}-hint`} className="hint muted">{field.hint}</span>
        </div>
      ))}
      <p className="muted">Values are JSON (<code>3</code>, <code>["det"]</code>) or plain text (<code>det</code>).</p>
      <button type="submit" className="submit" id="plan-add" disabled={!chosen}>Add to queue</button>
      {result && <p id="plan-result" role={result.ok ? "status" : "alert"}
                    className={result.ok ? "ok" : "error"}>{result.text}</p>}
    </form>
  );
}

export function QueuePanel({ queue }: { queue: QueueApi }) {
  const [answer, setAnswer] = useState("");
  const consoleRef = useRef<HTMLPreElement>(null);
  const s = queue.status;
  const run = async (path: string) => setAnswer((await queue.command(path)) || "");
  useEffect(() => {
    const pre = consoleRef.current;
    if (pre) pre.scrollTop = pre.scrollHeight;
  }, [queue.console]);
  const env = s?.worker_environment_exists;

  return (
    <Panel id="queue-panel" title="Queue" greyed={queue.problem !== ""}>
      {queue.problem && <p className="error banner" role="alert" id="queue-problem">{queue.problem}</p>}
      <p id="queue-status" className="muted">
        {s ? `Manager ${s.manager_state}; environment ${env ? "open" : "closed"}; ` +
             `${s.items_in_queue ?? 0} queued` + (s.queue_stop_pending ? "; stop requested" : "")
           : queue.problem ? "" : "Connecting…"}
      </p>
      <div className="row">
        {!env && <Action text="Open environment" onClick={() => run("/environment/open")} disabled={!s} />}
        <Action text="Start queue" onClick={() => run("/queue/start")}
                disabled={!s || !env || s.manager_state !== "idle"} />
        <Action text="Stop queue" tone="secondary" onClick={() => run("/queue/stop")}
                disabled={!s || s.manager_state !== "executing_queue" || !!s.queue_stop_pending}
                title="Stops after the running plan" />
      </div>
      {answer && <p className="error" role="alert" id="queue-answer">{answer}</p>}

      <div className="queue-grid">
      <div>
      <h3>Running</h3>
      <p id="queue-running">{queue.running ? <code>{itemText(queue.running)}</code>
        : <span className="muted">nothing</span>}</p>
      <Items id="queue-items" label="Queue" items={queue.queue} empty="The queue is empty." />
      <Items id="queue-history" label="History (newest first)" items={queue.history.slice(0, 10)}
             empty="No plans have run." />
      </div>
      <AddPlan queue={queue} />
      </div>
      <h3 id="console-title">Console output</h3>
      <pre id="queue-console" ref={consoleRef} className="console" tabIndex={0}
           aria-labelledby="console-title">{queue.console}</pre>
    </Panel>
  );
}
