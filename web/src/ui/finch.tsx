// The pieces of @blueskyproject/finch the page uses: its panel (Paper) and its Button.
// Finch's Button passes extra props to its <button>, but its type lists only its own:
// this wrapper adds the HTML attributes the page needs (type, aria-describedby, title)
// and a visible disabled state.
import type { ButtonHTMLAttributes, ReactNode } from "react";
import { Button, Paper } from "@blueskyproject/finch";
import type { ButtonProps } from "@blueskyproject/finch";

type FinchButtonProps = ButtonProps & Omit<ButtonHTMLAttributes<HTMLButtonElement>, "disabled">;
const FinchButton = Button as unknown as (props: FinchButtonProps) => ReactNode;

export interface ActionProps {
  text: string;
  onClick: () => void;
  disabled?: boolean;
  /** Id of the element that says why the button is disabled (or what it does). */
  describedBy?: string;
  tone?: "primary" | "danger" | "safe" | "secondary";
  title?: string;
  /** Accessible name when the text alone is ambiguous ("Stop" of which motor). */
  label?: string;
}

export function Action({ text, onClick, disabled = false, describedBy, tone = "primary", title,
                         label }: ActionProps) {
  // Colours: finch's Tailwind classes for the primary tone, styles.css (.action.tone-*)
  // for the others (finch.css holds only the classes finch itself uses).
  return (
    <FinchButton text={text} cb={onClick} disabled={disabled} type="button" size="small"
                 bgColor="bg-sky-700" hoverBgColor="hover:bg-sky-800"
                 styles={`action tone-${tone}`} aria-describedby={describedBy} title={title}
                 aria-label={label} />
  );
}

/** A titled panel: finch's Paper inside a labelled region. */
export function Panel({ id, title, className, children, greyed }:
  { id: string; title: string; className?: string; children: ReactNode; greyed?: boolean }) {
  return (
    <section id={id} aria-label={title} className={`panel ${greyed ? "greyed" : ""} ${className ?? ""}`}>
      <Paper title={title} size="full" rounded="large" className="panel-paper">
        <div className="panel-body">{children}</div>
      </Paper>
    </section>
  );
}
