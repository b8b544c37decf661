/* How the run and step pages word an entropy analysis: its target and unit, the error of dH1,
 * the ratio cell, the Taylor regimes.  Both pages read a flat row with the fields of
 * schemas.RunEntropyRow (the step page flattens its EntropyOut with flatRow).
 */
import { el, fmt, isNum } from "./dom.js";

/**
 * The two entropies an analysis can be about (the API's ?target=, schemas.EntropyOut.target):
 * the sequence entropy H, nats per response (docs/math.md §3), and the token-mean entropy T
 * that trainers log (TRL's `entropy`, verl's `actor/entropy`), nats per token (§8).  The API
 * answers the same fields for both; only their meaning and unit change.
 */
export const TARGETS = {
  sequence: {
    key: "sequence",
    symbol: "H",
    button: "sequence H",
    name: "sequence entropy H",
    d1: "dH1",
    d2: "dH2",
    delta: "ΔH",
    unit: "nats",
    per: "nats per response",
  },
  token_mean: {
    key: "token_mean",
    symbol: "T",
    button: "token mean T",
    name: "token-mean entropy T",
    d1: "dT1",
    d2: null, // the second-order term is not derived for T (docs/math.md §8)
    delta: "ΔT",
    unit: "nats/token",
    per: "nats per token",
  },
};

/** The target a URL asks for: `?target=` of the fragment, else of the query string; default sequence. */
export function targetOf(fragmentQuery, search) {
  const asked = new URLSearchParams(fragmentQuery).get("target") ?? new URLSearchParams(search).get("target");
  return Object.hasOwn(TARGETS, asked ?? "") ? TARGETS[asked] : TARGETS.sequence;
}

/** The fragment of `path` (e.g. "/runs/r") with the target kept in it, so a link reproduces the view. */
export const targetHref = (path, t) => `#${path}?target=${t.key}`;

/**
 * The target switch of the run and step pages: one link per target to this page under it
 * (<nav id="target-switch"> with <a data-target=key>, the shown one aria-current).
 */
export function targetSwitch(path, current) {
  return el(
    "nav",
    { id: "target-switch", class: "target-switch", "aria-label": "which entropy the numbers are about" },
    el("span", { class: "target-label", text: "entropy" }),
    Object.values(TARGETS).map((t) =>
      el("a", {
        href: targetHref(path, t),
        "data-target": t.key,
        "aria-current": t.key === current.key ? "true" : null,
        title: `${t.name}: every number in ${t.per}`,
        text: `${t.button} (${t.unit})`,
      }),
    ),
  );
}

// KL(π‖π′) thresholds of the Taylor regimes, nats (sketch/taylor.py, docs/math.md §6)
export const KL_FIRST_ORDER = 0.03;
export const KL_SECOND_ORDER = 0.3;

/** se of dH1 combining sampling and sketch error (independent sources). */
export const seTotal = (r) => Math.hypot(r.se_sampling, r.se_sketch);

/** Fixed-point text as Python's f"{v:.2f}" (the terminal report's ratio cell). */
const fixed2 = (v) => v.toFixed(2);

/**
 * The ratio cell of a flat row (ratio, ratio_low, ratio_high, ratio_estimable, regime), by
 * the rules of service/report.py `ratio_text`: the flag instead of the number when the step is
 * outside the Taylor regime or the ratio is not estimable.
 */
export function ratioText(r) {
  if (r.regime === "outside") return "outside Taylor";
  if (!isNum(r.ratio)) return "–";
  if (r.ratio_estimable === false) return "not estimable";
  let text = fixed2(r.ratio);
  if (isNum(r.ratio_low) && isNum(r.ratio_high)) text += ` [${fixed2(r.ratio_low)}, ${fixed2(r.ratio_high)}]`;
  if (r.regime === "second_order") text += " (2nd order)";
  return text;
}

/** The ratio when it is worth a number (estimable, inside the Taylor regime), else null. */
export const ratioShown = (r) => (r.regime !== "outside" && r.ratio_estimable !== false && isNum(r.ratio) ? r.ratio : null);

const REGIMES = {
  first_order: "first order",
  second_order: "second order",
  outside: "outside Taylor",
  unknown: "unknown",
};
/** What a regime means for a prediction of target `t`. */
export function regimeMeaning(regime, t) {
  if (regime === "first_order") return `KL(π‖π′) ≤ ${KL_FIRST_ORDER} nats: ${t.d1} alone should match the realized change`;
  if (regime === "second_order") return t.d2 ? `compare ${t.d1} + ${t.d2} with the realized change` : `${t.d1} may miss part of the change: no second-order term is derived for T (docs/math.md §8)`;
  if (regime === "outside") return "the step is too large for a Taylor prediction";
  return "no logprob_after: the step's size is not known";
}

/** The regime's words; "–" for a step without an analysis (regime null). */
export const regimeLabel = (v) => (v ? REGIMES[v] : "–");

/** The regime's reasons (the thresholds the step passed), else what the regime means. */
export const regimeNote = (regime, reasons, t) => (reasons.length ? reasons.join("; ") : regimeMeaning(regime, t));

/** "x ± se" as a node: the value, then the s.e. in muted text (only when known). */
export function pmText(v, se) {
  if (!isNum(v)) return "–";
  return isNum(se) ? el("span", {}, fmt(v), el("span", { class: "pm", text: ` ± ${fmt(se)}` })) : fmt(v);
}

/**
 * A step's EntropyOut (api.js) flat as a RunEntropyRow, plus the fields the run page draws
 * that the history leaves out (cov_baseline, b_simple, step_norm).
 */
export function flatRow(step, e) {
  const real = e.realized;
  const interval = e.ratio_interval;
  return {
    step,
    target: e.target,
    delta_h1: e.delta_h1,
    estimator: e.estimator,
    se_sampling: e.se_sampling,
    se_sketch: e.se_sketch,
    realized: real ? real.delta_h : null,
    realized_se: real ? real.se : null,
    realized_source: real ? real.source : null,
    realized_snis: real ? real.delta_h_snis : null,
    ratio: e.ratio,
    ratio_low: interval ? interval.low : null,
    ratio_high: interval ? interval.high : null,
    ratio_estimable: interval ? interval.estimable : null,
    kl: e.taylor.kl,
    kl_se: e.taylor.kl_se,
    regime: e.taylor.regime,
    regime_reasons: e.taylor.reasons,
    delta_h1_applied: e.delta_h1_applied,
    delta_h2: e.delta_h2,
    delta_h1_plus_h2: e.delta_h1_plus_h2,
    cov_baseline: e.cov_baseline,
    b_simple: e.noise_scale.b_simple,
    step_norm: e.step_norm,
  };
}
