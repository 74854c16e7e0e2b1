// The simulated beamline. Gated writes (Move, Open) follow the lock: enabled only while
// this page's session may write, else disabled with the holder named. Stop and the
// shutter's Close are never gated by the lock (issue 14): they stay enabled whenever the
// device server is reachable.
import { useState, type FormEvent } from "react";
import type { AppConfig, DeviceConfig } from "../config";
import type { DevicesApi } from "../devices/useDevices";
import type { SetResult } from "../devices/outcome";
import { record, type PvStore } from "../lock/pvstore";
import type { LockApi } from "../lock/useLock";
import { writeGate, type WriteGate } from "../lock/view";
import { Action, Panel } from "./finch";

function shown(store: PvStore, signal: string, digits = 3): string {
  const rec = record(store, signal);
  if (!rec.hasValue) return "…";
  if (!rec.connected) return "disconnected";
  const v = rec.value;
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

/** Units only after a value: a signal without one reads "disconnected", not "disconnected mm". */
function unitsOf(store: PvStore, signal: string, units: string): string {
  const rec = record(store, signal);
  return rec.hasValue && rec.connected && units ? ` ${units}` : "";
}

/** A motor position: always 3 decimals (a readback of 0 reads 0.000 mm). */
function fixed(store: PvStore, signal: string): string {
  const rec = record(store, signal);
  return typeof rec.value === "number" && rec.connected ? rec.value.toFixed(3) : shown(store, signal);
}

function Result({ id, result }: { id: string; result?: SetResult }) {
  return (
    <p id={id} role="status" aria-live="polite" className={`result ${result?.kind === "error" ? "error" : "muted"}`}>
      {result?.text ?? ""}
    </p>
  );
}

interface RowProps {
  cfg: AppConfig;
  device: DeviceConfig;
  devices: DevicesApi;
  lock: LockApi;
  gate: WriteGate;
  online: boolean;
}

function Motor({ cfg, device, devices, lock, gate, online }: RowProps) {
  const [target, setTarget] = useState("");
  const name = device.name;
  const units = devices.units[`${name}_readback`] ?? devices.units[`${name}_setpoint`] ?? "";
  const moving = record(devices.store, `${name}_moving`).value === 1;
  const value = Number(target);
  const valid = target.trim() !== "" && Number.isFinite(value);
  const move = (event: FormEvent) => {
    event.preventDefault();
    if (gate.allowed && valid && online) devices.set(name, value);
  };
  const stopPv = `${cfg.beamlinePrefix}${name}:STOP`;
  return (
    <form className="device" onSubmit={move} aria-labelledby={`${name}-label`}>
      <h3 id={`${name}-label`}>{device.label}</h3>
      <p className="reading"><span id={`${name}-readback`}>{fixed(devices.store, `${name}_readback`)}</span>
        {unitsOf(devices.store, `${name}_readback`, units)}
        {moving && <span className="moving" id={`${name}-moving`}> moving</span>}
        <span className="muted"> (setpoint {fixed(devices.store, `${name}_setpoint`)})</span></p>
      <div className="row">
        <label htmlFor={`${name}-target`} className="inline">Target</label>
        <input id={`${name}-target`} type="number" step="any" value={target} className="narrow"
               onChange={(e) => setTarget(e.target.value)} aria-describedby="devices-gate" />
        <button type="submit" id={`${name}-move`} className="submit"
                disabled={!gate.allowed || !online || !valid} aria-describedby="devices-gate"
                aria-label={`Move ${device.label}`}>Move</button>
        <Action text="Stop" label={`Stop ${device.label}`} tone="safe" disabled={!lock.socketOpen}
                title="Stop is never refused by the lock" onClick={() => lock.putPv(stopPv, 1)} />
      </div>
      <Result id={`${name}-result`} result={devices.results[name]} />
    </form>
  );
}

function Shutter({ device, devices, gate, online }: RowProps) {
  const name = device.name;
  const status = record(devices.store, `${name}_status`);
  const text = !status.hasValue ? "…" : !status.connected ? "disconnected"
    : status.value === 1 || status.value === "Open" ? "Open" : "Closed";
  return (
    <div className="device" role="group" aria-labelledby={`${name}-label`}>
      <h3 id={`${name}-label`}>{device.label}</h3>
      <p className="reading" id={`${name}-status`}>{text}</p>
      <div className="row">
        <Action text="Open" label={`Open ${device.label}`} disabled={!gate.allowed || !online} describedBy="devices-gate"
                onClick={() => devices.set(name, "Open")} />
        <Action text="Close" label={`Close ${device.label}`} tone="safe" disabled={!online}
                title="Closing the shutter is never refused by the lock"
                onClick={() => devices.set(name, "Close")} />
      </div>
      <Result id={`${name}-result`} result={devices.results[name]} />
    </div>
  );
}

function Readings({ device, devices, signals }: RowProps & { signals: [string, string][] }) {
  return (
    <div className="device" role="group" aria-labelledby={`${device.name}-label`}>
      <h3 id={`${device.name}-label`}>{device.label}</h3>
      <dl className="facts">
        {signals.map(([signal, label]) => (
          <div key={signal} className="fact">
            <dt>{label}</dt>
            <dd id={`${signal}`}>{shown(devices.store, signal, 2)}{unitsOf(devices.store, signal, devices.units[signal] ?? "")}</dd>
          </div>
        ))}
      </dl>
    </div>
  );
}

export function DevicesPanel({ cfg, devices, lock }: { cfg: AppConfig; devices: DevicesApi; lock: LockApi }) {
  const online = devices.store.socketOpen;
  const gate: WriteGate = online ? writeGate(lock.view, lock.session, cfg, cfg.allowFreeWrites)
    : { allowed: false, reason: "device server unreachable (ophyd-websocket)" };
  return (
    <Panel id="devices-panel" title="Devices" greyed={!online || !lock.view.known}>
      <p id="devices-gate" role="status" aria-live="polite" className={gate.allowed ? "ok" : "gate"}>
        {gate.allowed ? "You may move devices." : `Moves disabled: ${gate.reason}`}
      </p>
      {lock.socketError && <p className="error" id="devices-socket-error">{lock.socketError}</p>}
      {cfg.devices.map((device) => {
        const props: RowProps = { cfg, device, devices, lock, gate, online };
        switch (device.kind) {
          case "motor": return <Motor key={device.name} {...props} />;
          case "shutter": return <Shutter key={device.name} {...props} />;
          case "detector":
            return <Readings key={device.name} {...props} signals={[[`${device.name}_counts`, "Counts"],
                                                                      [`${device.name}_acquire_time`, "Count time"]]} />;
          default:
            return <Readings key={device.name} {...props} signals={[[`${device.name}_ring_current`, "Ring current"],
                                                                      [`${device.name}_energy`, "Energy"],
                                                                      [`${device.name}_hutch_searched`, "Hutch searched"]]} />;
        }
      })}
    </Panel>
  );
}
