// From the queue server's description of an allowed plan to a form, and from the form's
// text back to a queue item. Values are typed as JSON (1, 0.5, ["det"], {"a": 1}) or, if
// that fails, taken as text (det). An empty field leaves the plan's default. Whether the
// result is valid is the queue server's decision: its reason is shown as it says it.

export interface PlanParameter {
  name: string;
  kind?: { name?: string; value?: number };
  default?: string;
  annotation?: { type?: string };
  description?: string;
}

export interface PlanDescription {
  name: string;
  description?: string;
  parameters?: PlanParameter[];
}

export interface Field {
  name: string;
  /** "arg" (positional only), "kwarg", "args" (*args: a JSON list), "kwargs" (**kwargs: a JSON object). */
  role: "arg" | "kwarg" | "args" | "kwargs";
  hint: string;
  required: boolean;
}

const POSITIONAL_ONLY = 0, VAR_POSITIONAL = 2, VAR_KEYWORD = 4;

export function planFields(plan: PlanDescription): Field[] {
  return (plan.parameters ?? []).map((p) => {
    const kind = p.kind?.value ?? 1;
    const role: Field["role"] = kind === POSITIONAL_ONLY ? "arg" : kind === VAR_POSITIONAL ? "args"
      : kind === VAR_KEYWORD ? "kwargs" : "kwarg";
    const parts = [p.annotation?.type, p.default !== undefined ? `default ${p.default}` : ""]
      .filter(Boolean);
    if (role === "args") parts.unshift("JSON list");
    if (role === "kwargs") parts.unshift("JSON object");
    return { name: p.name, role, hint: parts.join(", "),
             required: p.default === undefined && role !== "args" && role !== "kwargs" };
  });
}

/** Text of a field as a value: JSON if it parses, else the text itself. */
export function parseValue(text: string): unknown {
  const t = text.trim();
  try {
    return JSON.parse(t);
  } catch {
    return t;
  }
}

export interface Item {
  item_type: "plan";
  name: string;
  args: unknown[];
  kwargs: Record<string, unknown>;
}

/** The queue item for a plan and its form's texts (by field name). */
export function planItem(plan: PlanDescription, texts: Record<string, string>): Item {
  const args: unknown[] = [];
  const kwargs: Record<string, unknown> = {};
  for (const field of planFields(plan)) {
    const text = (texts[field.name] ?? "").trim();
    if (text === "") continue;
    const value = parseValue(text);
    if (field.role === "arg") args.push(value);
    else if (field.role === "args") args.push(...(Array.isArray(value) ? value : [value]));
    else if (field.role === "kwargs" && value && typeof value === "object" && !Array.isArray(value)) {
      Object.assign(kwargs, value);
    } else kwargs[field.name] = value;
  }
  return { item_type: "plan", name: plan.name, args, kwargs };
}

/** "count(detectors=['det'], num=3)" for the queue lists. */
export function itemText(item: { name?: string; args?: unknown[]; kwargs?: Record<string, unknown> }): string {
  const parts = [...(item.args ?? []).map((a) => JSON.stringify(a)),
                 ...Object.entries(item.kwargs ?? {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`)];
  return `${item.name ?? "?"}(${parts.join(", ")})`;
}
