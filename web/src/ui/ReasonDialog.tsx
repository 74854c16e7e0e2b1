// A modal that asks for the reason of an operator command and shows what will be sent.
// Native <dialog>: focus moves into it, Escape cancels.
import { useEffect, useRef, useState, type FormEvent } from "react";

export interface ReasonRequest {
  command: "ForceRelease" | "Disable" | "Enable";
  title: string;
  required: boolean;
}

/** A reason ophyd-websocket would not turn into a number (it converts numeric text). */
export function reasonProblem(reason: string, required: boolean): string {
  const text = reason.trim();
  if (!text) return required ? "a reason is required" : "";
  if (/^[\d.-]+$/.test(text)) return "say it in words (a bare number would be sent as a number)";
  return "";
}

export function ReasonDialog({ request, pv, onConfirm, onCancel }: {
  request: ReasonRequest; pv: string;
  onConfirm: (reason: string) => void; onCancel: () => void;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  const [reason, setReason] = useState("");
  const [problem, setProblem] = useState("");
  useEffect(() => {
    const dialog = ref.current;
    if (dialog && !dialog.open) dialog.showModal();
  }, []);

  const submit = (event: FormEvent) => {
    event.preventDefault();
    const why = reasonProblem(reason, request.required);
    if (why) {
      setProblem(why);
      return;
    }
    onConfirm(reason.trim());
  };

  return (
    <dialog ref={ref} className="reason-dialog" aria-labelledby="reason-title"
            onCancel={(e) => { e.preventDefault(); onCancel(); }}>
      <form onSubmit={submit}>
        <h2 id="reason-title">{request.title}</h2>
        <label htmlFor="reason-text">Reason{request.required ? "" : " (optional)"}</label>
        <textarea id="reason-text" autoFocus rows={3} value={reason}
                  onChange={(e) => { setReason(e.target.value); setProblem(""); }}
                  aria-describedby="reason-sent" aria-invalid={problem !== ""} />
        <p id="reason-sent" className="muted">Sends your reason to <code>{pv}</code>; the lock
          records it with your name in its History.</p>
        {problem && <p className="error" role="alert">{problem}</p>}
        <div className="row">
          <button type="submit" className="submit danger">{request.title}</button>
          <button type="button" className="submit secondary" onClick={onCancel}>Cancel</button>
        </div>
      </form>
    </dialog>
  );
}
