// Login, then the beamline page; logout (or an expired session) releases a held lock,
// forgets the API key and returns to the login page with a message.
//
// The beamline page (and with it @blueskyproject/finch, one 10 MB module that bundlers
// cannot tree-shake) is a chunk of its own, loaded after login: the login page stays small.
import { Suspense, lazy, useCallback, useEffect, useState } from "react";
import { owsCookie, type AppConfig } from "./config";
import { SessionExpired, Unreachable, revoke, whoami, type Session } from "./net/httpserver";
import { LoginPage } from "./ui/LoginPage";

const Beamline = lazy(() => import("./Beamline"));

const KEY_STORE = "beamline-lock.apiKey";

function setCookie(cfg: AppConfig, user: string, key: string | null): void {
  const cookie = owsCookie(cfg, user, key, window.location.href);
  if (cookie !== null) document.cookie = cookie;
}

export function App({ cfg }: { cfg: AppConfig }) {
  const [session, setSession] = useState<Session | null>(null);
  const [notice, setNotice] = useState("");
  const [restoring, setRestoring] = useState(true);

  // A reload keeps the tab's session (sessionStorage: this tab only).
  useEffect(() => {
    const key = sessionStorage.getItem(KEY_STORE);
    if (!key) {
      setRestoring(false);
      return;
    }
    whoami(cfg, key).then((s) => {
      setCookie(cfg, s.user, s.apiKey);
      setSession(s);
    }).catch((err) => {
      sessionStorage.removeItem(KEY_STORE);
      setNotice(err instanceof SessionExpired ? "Your session has ended. Please log in again."
        : err instanceof Unreachable ? `${err.message}: log in again when it is back.` : String(err));
    }).finally(() => setRestoring(false));
  }, [cfg]);

  const onLogin = useCallback((s: Session) => {
    sessionStorage.setItem(KEY_STORE, s.apiKey);
    setCookie(cfg, s.user, s.apiKey);
    setNotice("");
    setSession(s);
  }, [cfg]);

  const onLogout = useCallback((message: string, revokeKey: boolean) => {
    if (session) {
      if (revokeKey) void revoke(cfg, session.apiKey);
      setCookie(cfg, session.user, null);
    }
    sessionStorage.removeItem(KEY_STORE);
    setSession(null);
    setNotice(message);
  }, [cfg, session]);

  if (restoring) return <p className="muted loading">Loading…</p>;
  if (!session) return <LoginPage cfg={cfg} notice={notice} onLogin={onLogin} />;
  return (
    <Suspense fallback={<p className="muted loading" role="status">Loading the beamline page…</p>}>
      <Beamline key={session.apiKey} cfg={cfg} session={session} onLogout={onLogout} />
    </Suspense>
  );
}
