import { useEffect, useRef, useState, type FormEvent } from "react";
import type { AppConfig } from "../config";
import { ApiError, login, type Session } from "../net/httpserver";

export function LoginPage({ cfg, notice, onLogin }:
  { cfg: AppConfig; notice: string; onLogin: (s: Session) => void }) {
  const [user, setUser] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const userRef = useRef<HTMLInputElement>(null);
  useEffect(() => userRef.current?.focus(), []);

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setError("");
    try {
      onLogin(await login(cfg, user.trim(), password));
    } catch (err) {
      setError(err instanceof ApiError ? err.detail : err instanceof Error ? err.message : String(err));
      setPassword("");
    } finally {
      setBusy(false);
    }
  };

  return (
    <main className="login" aria-labelledby="login-title">
      <form onSubmit={submit} className="login-form" aria-describedby="login-help">
        <h1 id="login-title">Beamline — remote access</h1>
        <p id="login-help" className="muted">Log in with your beamline account: the queue,
          the devices and the beamline lock.</p>
        {notice && <p className="notice" role="status" id="login-notice">{notice}</p>}
        <label htmlFor="login-user">User name</label>
        <input id="login-user" ref={userRef} name="username" autoComplete="username"
               value={user} onChange={(e) => setUser(e.target.value)} required />
        <label htmlFor="login-password">Password</label>
        <input id="login-password" name="password" type="password" autoComplete="current-password"
               value={password} onChange={(e) => setPassword(e.target.value)} required />
        {error && <p className="error" role="alert" id="login-error">{error}</p>}
        <button type="submit" className="submit" disabled={busy}>{busy ? "Logging in…" : "Log in"}</button>
      </form>
    </main>
  );
}
