/* How the run and step pages word an entropy analysis: the error of dH1, the ratio cell, the
 * Taylor regimes.  Both pages read a flat row with the fields of schemas.RunEntropyRow (the step
 * page flattens its EntropyChange with flatRow).
 */
import { el, fmt, isNum } from "./dom.js";

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
export const REGIME_NOTES = {
  first_order: `KL(π‖π′) ≤ ${KL_FIRST_ORDER} nats: dH1 alone should match the realized change`,
  second_order: "compare dH1 + dH2 with the realized change",
  outside: "the step is too large for a Taylor prediction",
  unknown: "no logprob_after: the step's size is not known",
};

/** The regime's words; "–" for a step without an analysis (regime null). */
export const regimeLabel = (v) => (v ? REGIMES[v] : "–");

/** The regime's reasons (the thresholds the step passed), else what the regime means. */
export const regimeNote = (regime, reasons) => (reasons.length ? reasons.join("; ") : REGIME_NOTES[regime]);

/** "x ± se" as a node: the value, then the s.e. in muted text (only when known). */
export function pmText(v, se) {
  if (!isNum(v)) return "–";
  return isNum(se) ? el("span", {}, fmt(v), el("span", { class: "pm", text: ` ± ${fmt(se)}` })) : fmt(v);
}

/**
 * A step's EntropyChange (api.js) flat as a RunEntropyRow, plus the fields the run page draws
 * that the history leaves out (cov_baseline, b_simple, step_norm).
 */
export function flatRow(step, e) {
  const real = e.realized;
  const interval = e.ratio_interval;
  return {
    step,
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
