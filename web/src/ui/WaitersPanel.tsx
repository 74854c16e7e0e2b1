// Who waits for the lock, and the page's Request / Withdraw / Hand over (issue 18).
// Additive: LockPanel renders it under the Take form, with that form's note and lease.
import { useEffect, useState } from "react";
import { duration, heldBy } from "../lock/view";
import type { LockApi } from "../lock/useLock";
import { Action } from "./finch";

export function WaitersPanel({ lock, note, lease, leaseOk }:
  { lock: LockApi; note: string; lease: number; leaseOk: boolean }) {
  const { view, line } = lock;
  const [, setTick] = useState(0);
  useEffect(() => {                     // the waiting times count up
    const timer = setInterval(() => setTick((t) => t + 1), 1000);
    return () => clearInterval(timer);
  }, []);
  const now = Date.now() / 1000;
  const mine = heldBy(view, lock.session);
  const waiting = line.place !== null;
  const first = line.waiters[0];
  return (
    <div id="lock-line" className="lock-line" role="group" aria-label="Waiting for the lock">
      <h3 id="lock-line-title">Waiting ({line.waiters.length})</h3>
      {line.yieldTo && (
        <p id="lock-yield" className="muted">The queue hands the lock to {line.yieldTo} at the
          end of its plan.</p>
      )}
      {line.waiters.length > 0 && (
        <ol id="lock-waiters" aria-labelledby="lock-line-title">
          {line.waiters.map((w) => (
            <li key={`${w.who} ${w.session}`}>
              {w.who} ({w.session}), waiting {duration(now - w.since)}
              {w.note ? `: ${w.note}` : ""}
            </li>
          ))}
        </ol>
      )}
      <div className="row">
        <Action text="Request" describedBy="lock-line-help" tone="secondary"
                disabled={!view.known || mine || waiting || !leaseOk}
                onClick={() => lock.request(lease, note)} />
        <Action text="Withdraw" describedBy="lock-line-help" tone="secondary"
                disabled={!waiting} onClick={lock.withdraw} />
        <Action text="Hand over" describedBy="lock-line-help"
                label={first ? `Hand over to ${first.who}` : "Hand over"}
                disabled={!mine || !first} onClick={lock.handover} />
      </div>
      <p id="lock-line-help" className="muted" role="status" aria-live="polite">
        {waiting ? `You wait in line: place ${line.place} of ${line.waiters.length}` +
                   " (this tab renews your request; the lock is yours when it is released)."
          : mine && first ? `Hand over gives the lock to ${first.who} at once.`
          : "Request: the lock if it is free for you, else a place in line."}
      </p>
    </div>
  );
}
