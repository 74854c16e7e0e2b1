import { useState, type FormEvent } from "react";
import type { AppConfig } from "../config";
import { canTake, type Outcome } from "../lock/keepalive";
import type { LockApi } from "../lock/useLock";
import { duration, heldBy, heldText } from "../lock/view";
import type { QueueItem } from "../queue/useQueue";
import { itemText } from "../queue/plans";
import { Action, Panel } from "./finch";
import { ReasonDialog, type ReasonRequest } from "./ReasonDialog";
import { WaitersPanel } from "./WaitersPanel";

function outcomeText(outcome: Outcome | null, message: string): string {
  switch (outcome?.kind) {
    case "waiting": return "Asked for the lock; waiting for its answer…";
    case "refused": return `Take refused: ${outcome.message}`;
    case "no-grant": return `No grant: ${message || "the lock did not answer"}`;
    case "ended": return "Your lock ended: see the last lock message above.";
    case "released": return "You released the lock.";
    default: return "";
  }
}

const OPERATOR: ReasonRequest[] = [
  { command: "ForceRelease", title: "Force release", required: true },
  { command: "Disable", title: "Disable the lock", required: true },
  { command: "Enable", title: "Enable the lock", required: false },
];

export function LockPanel({ cfg, lock, operator, running }:
  { cfg: AppConfig; lock: LockApi; operator: boolean; running: QueueItem | null }) {
  const { view, ka } = lock;
  const [note, setNote] = useState("");
  const [lease, setLease] = useState(String(cfg.defaultLease));
  const [asking, setAsking] = useState<ReasonRequest | null>(null);
  const mine = heldBy(view, lock.session);
  const holder = view.holder;
  const queueHolds = holder?.session === cfg.queueSession;
  const leaseSeconds = Number(lease);
  const leaseProblem = !(leaseSeconds > 0) ? "lease must be a positive number of seconds"
    : view.leaseMax !== null && leaseSeconds > view.leaseMax ? `at most ${view.leaseMax} s` : "";
  const stateLabel = view.state === "unknown" ? "Lock state unknown" : view.state;

  const submit = (event: FormEvent) => {
    event.preventDefault();
    if (!leaseProblem && canTake(view) && !mine) lock.take(leaseSeconds, note);
  };

  return (
    <Panel id="lock-panel" title="Beamline lock" greyed={!view.known}>
      <p id="lock-state" className={`lock-state state-${view.state}`} role="status" aria-live="polite">
        {stateLabel}
      </p>
      {!view.known && <p className="muted" id="lock-unknown">{view.unknownReason}. Writes are disabled.</p>}
      {view.state === "Held" && holder && (
        <div id="lock-holder">
          <p className="holder">{mine ? "Held by you" : heldText(holder, cfg)}</p>
          {queueHolds && (
            <p id="lock-queue" className="muted">The bluesky queue holds the lock
              {running ? `: running ${itemText(running)}` : ""}.</p>
          )}
          <dl className="facts">
            <dt>Owner</dt><dd id="lock-owner">{holder.owner ?? "…"}</dd>
            <dt>Session</dt><dd id="lock-session">{holder.session ?? "…"}</dd>
            <dt>Note</dt><dd id="lock-note">{holder.note ?? ""}</dd>
            <dt>Time left</dt><dd id="lock-remaining">{holder.remaining !== null ? duration(holder.remaining) : "…"}</dd>
            <dt>Token</dt><dd id="lock-token">{view.token ?? "…"}</dd>
          </dl>
        </div>
      )}
      {view.state === "Disabled" && <p id="lock-disabled" className="holder">Disabled: {view.disabledReason}</p>}
      {view.message && <p className="message"><span className="muted">Last lock message: </span>
        <span id="lock-message">{view.message}</span></p>}

      <form className="take-form" onSubmit={submit} aria-label="Take the lock">
        <div className="field">
          <label htmlFor="take-note">Note</label>
          <input id="take-note" value={note} onChange={(e) => setNote(e.target.value)}
                 placeholder="what you will do" maxLength={500} />
        </div>
        <div className="field narrow">
          <label htmlFor="take-lease">Lease (s)</label>
          <input id="take-lease" type="number" min={1} value={lease}
                 onChange={(e) => setLease(e.target.value)} aria-invalid={leaseProblem !== ""}
                 aria-describedby="take-lease-help" />
        </div>
        <div className="row">
          <button type="submit" id="lock-take" className="submit"
                  disabled={!canTake(view) || mine || leaseProblem !== ""}>Take</button>
          <Action text="Renew" onClick={lock.renew} disabled={!mine} />
          <Action text="Release" onClick={lock.release} disabled={!mine} tone="secondary" />
        </div>
        <p id="take-lease-help" className="muted">
          {leaseProblem || (mine ? `Kept alive while this tab is open (renewed every ${Math.round(ka.lease / 3)} s).`
            : "While you hold it, this tab renews your lease; logging out releases it.")}
        </p>
      </form>
      <p id="lock-outcome" role="status" aria-live="polite"
         className={ka.outcome?.kind === "refused" || ka.outcome?.kind === "no-grant" ? "error" : ""}>
        {outcomeText(ka.outcome, view.message)}
      </p>
      <WaitersPanel lock={lock} note={note} lease={leaseSeconds} leaseOk={leaseProblem === ""} />

      {operator && (
        <div className="operator" role="group" aria-label="Operator commands">
          <h3>Operator</h3>
          <div className="row">
            {OPERATOR.map((req) => (
              <Action key={req.command} text={req.title} tone="danger"
                      disabled={!view.known || (req.command === "ForceRelease" ? view.state !== "Held"
                        : req.command === "Enable" ? view.state !== "Disabled" : view.state === "Disabled")}
                      onClick={() => setAsking(req)} />
            ))}
          </div>
        </div>
      )}
      {asking && (
        <ReasonDialog request={asking} pv={cfg.lockPrefix + asking.command}
                      onCancel={() => setAsking(null)}
                      onConfirm={(reason) => { lock.operator(asking.command, reason); setAsking(null); }} />
      )}

      <h3 id="history-title">History (newest first)</h3>
      <ol className="history" aria-labelledby="history-title" id="lock-history">
        {view.history.slice(0, 10).map((line, i) => <li key={i}>{line}</li>)}
      </ol>
    </Panel>
  );
}
