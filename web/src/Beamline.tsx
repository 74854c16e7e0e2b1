// The beamline page after login: the lock, the devices and the queue side by side.
// Logout (or an expired session) first releases this page's lock.
import { useCallback, useMemo, useState } from "react";
import type { AppConfig } from "./config";
import { useDevices } from "./devices/useDevices";
import { useLock } from "./lock/useLock";
import type { Session } from "./net/httpserver";
import { useQueue } from "./queue/useQueue";
import { Action } from "./ui/finch";
import { DevicesPanel } from "./ui/DevicesPanel";
import { LockPanel } from "./ui/LockPanel";
import { QueuePanel } from "./ui/QueuePanel";

export default function Beamline({ cfg, session, onLogout }:
  { cfg: AppConfig; session: Session; onLogout: (message: string, revokeKey: boolean) => void }) {
  const [leaving, setLeaving] = useState(false);
  const stopPvs = useMemo(() => cfg.devices.filter((d) => d.kind === "motor")
    .map((d) => `${cfg.beamlinePrefix}${d.name}:STOP`), [cfg]);
  const lock = useLock(cfg, session.user, session.apiKey, stopPvs);
  const devices = useDevices(cfg, session.user, session.apiKey);
  const { releaseAndWait } = lock;

  const leave = useCallback(async (message: string, revokeKey: boolean) => {
    setLeaving(true);
    await releaseAndWait(3000);
    onLogout(message, revokeKey);
  }, [releaseAndWait, onLogout]);

  const queue = useQueue(cfg, session.apiKey, (why) => { void leave(why, false); });
  const operator = session.roles.some((r) => cfg.operatorRoles.includes(r));
  const roles = session.roles.length ? session.roles.join(", ") : "no role";

  return (
    <div className="app">
      <header className="top">
        <h1>Beamline</h1>
        <p id="whoami">Signed in as <strong>{session.user}</strong>
          <span className="muted"> — role: <span id="role">{roles}</span>; lock session {lock.session}</span></p>
        <Action text={leaving ? "Logging out…" : "Log out"} tone="secondary" disabled={leaving}
                onClick={() => void leave("You have logged out.", true)} />
      </header>
      <main className="panels">
        <LockPanel cfg={cfg} lock={lock} operator={operator} running={queue.running} />
        <DevicesPanel cfg={cfg} devices={devices} lock={lock} />
        <QueuePanel queue={queue} />
      </main>
    </div>
  );
}
