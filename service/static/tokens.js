/* The tokens that move the entropy (docs/math.md §9), from the step's TokensOut (api.js): the
 * step page's "tokens" card and the colour scale the sequence view paints its tokens with.
 *
 * A token's share a_{i,t} is its exact part of the step's dH1: negative pushes the entropy
 * down, positive up.  Colours: vermillion for down, blue for up (Okabe-Ito, colour-blind
 * safe), fading to white at 0.  Every colour is set through the CSSOM (`--c`, `--h`): the page's
 * Content-Security-Policy refuses style attributes.
 */
import { ApiError, getTokens } from "./api.js";
import { el, fmt, fmtPct, isNum, sortableTable } from "./dom.js";

const enc = encodeURIComponent;
const DOWN_RGB = [213, 94, 0]; // #D55E00: the share pushes the entropy down
const UP_RGB = [0, 114, 178]; // #0072B2: the share pushes the entropy up
/** verl's KL-Cov ratio, the service's default: on a small run it picks one token. */
export const VERL_KL_COV_RATIO = 0.0002;
const LEGEND_STEPS = [-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1];

/** The colour of a share `v` on a scale symmetric about 0 reaching ±`max`. */
export function shareColor(v, max) {
  const t = max > 0 ? Math.max(-1, Math.min(1, v / max)) : 0;
  const [r, g, b] = t < 0 ? DOWN_RGB : UP_RGB;
  const a = Math.abs(t);
  const mix = (x) => Math.round(255 + (x - 255) * a);
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

/** "down", "up" or "zero": which way a share pushes the entropy. */
export const shareSide = (v) => (v < 0 ? "down" : v > 0 ? "up" : "zero");

/** The largest |share| of the step: its most negative and most positive token (and `more`). */
export function shareScale(tokens, more = []) {
  const all = [...tokens.down, ...tokens.up, ...more].map((t) => Math.abs(t.share));
  return Math.max(0, ...all);
}

/** A colour key of the share scale: cells from -max to +max with their values (div.share-legend). */
export function shareLegend(max, unit) {
  return el(
    "div",
    { class: "share-legend", "data-max": max },
    el("span", { class: "share-legend-end", text: "pushes entropy down ←" }),
    LEGEND_STEPS.map((t) => {
      const cell = el("span", { class: "share-legend-cell", "data-value": t * max, title: `share ${fmt(t * max)} ${unit}` });
      cell.style.setProperty("--c", shareColor(t * max, max));
      return el("span", { class: "share-legend-item" }, cell, el("span", { class: "share-legend-label", text: fmt(t * max) }));
    }),
    el("span", { class: "share-legend-end", text: "→ pushes entropy up" }),
  );
}

/** A token's text as shown: its decoded text with a newline made visible, else its id. */
export const tokenText = (t) => (t.token === null ? `#${t.token_id}` : t.token.replace(/\n/g, "↵"));

/** The hover text of a token: where it is, its share, covariance score, log-prob and advantage. */
export function tokenTitle(t, unit) {
  const text = t.token === null ? "(no text)" : JSON.stringify(t.token);
  return [
    `${text}, token id ${t.token_id}, position ${t.position} of ${t.sequence_id}`,
    `share ${fmt(t.share)} ${unit}`,
    `covariance score ${fmt(t.cov_score)}`,
    `log-prob ${fmt(t.logprob)}`,
    `advantage ${fmt(t.advantage)}`,
  ].join("\n");
}

/** The fragment of a sequence's view (keeps the page's target and KL-Cov ratio). */
export function sequenceHref(runId, step, id, t, klCovRatio) {
  const q = new URLSearchParams({ target: t.key });
  if (klCovRatio) q.set("kl_cov_ratio", String(klCovRatio));
  return `#/runs/${enc(runId)}/steps/${step}/sequences/${enc(id)}?${q}`;
}

/** The step's TokensOut, or null when the trainer pushed no token shares (the API's 404). */
export async function tokensOrNull(runId, step, opts) {
  try {
    return await getTokens(runId, step, opts);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}

/** The covariance comparison's numbers: KL-Cov's and Clip-Cov's picks against the shares. */
function covarianceKpis(c, unit) {
  return [
    { key: "precision", label: `precision at k = ${c.k}`, value: c.precision_at_k, text: fmtPct(c.precision_at_k), note: `of KL-Cov's ${c.k} tokens (ratio ${c.kl_cov_ratio} of ${c.num_tokens}), the fraction among the ${c.k} pushing entropy down most` },
    { key: "spearman", label: "Spearman (covariance score, −share)", value: c.spearman, text: fmt(c.spearman), note: "1: the covariance score ranks the tokens as their shares do" },
    { key: "selected", label: "share of dH1 in KL-Cov's tokens", value: c.selected_share, text: fmtPct(c.selected_share), note: `their shares sum to ${fmt(c.selected_sum)} ${unit}` },
    { key: "clip", label: "Clip-Cov candidates", value: c.clip_candidates, text: `${c.clip_candidates} of ${c.num_tokens}`, note: `covariance score in [${fmt(c.clip_cov_lb)}, ${fmt(c.clip_cov_ub)}]; Clip-Cov clips ${c.clip_k} of them (ratio ${c.clip_cov_ratio})` },
    { key: "clip-share", label: "share of dH1 in Clip-Cov's candidates", value: c.clip_candidate_share, text: fmtPct(c.clip_candidate_share), note: "" },
  ];
}

/**
 * Draw the "tokens" card of a step into `box` (a section): the KL-Cov ratio form, the
 * covariance comparison, and the tokens pushing entropy down and up (tables whose sequence
 * and token cells link to the sequence view).  `tokens`: TokensOut or null (no shares: a
 * one-line hint); `onRatio(r)`: called with the ratio the user asks for; `draft`: the page's
 * `{ value }` of a ratio typed but not applied yet, which a redraw (new data, a resize) keeps
 * with the field's focus instead of resetting what the user is typing.
 */
export function drawTokensCard(box, tokens, { runId, step, t, klCovRatio, onRatio, sorts, draft }) {
  box.dataset.card = "tokens";
  box.className = "card wide tokens-card";
  if (tokens === null) {
    box.replaceChildren(el("p", { class: "sub", id: "tokens-none", text: "No token shares at this step (a trainer pushes them with POST …/tokens; docs/math.md §9)." }));
    return;
  }
  const c = tokens.covariance;
  const unit = tokens.target === "token_mean" ? "nats/token" : "nats";
  const focused = document.activeElement !== null && document.activeElement.id === "kl-cov-ratio";
  const input = el("input", { id: "kl-cov-ratio", type: "number", min: "0", max: "1", step: "any", value: draft.value ?? String(klCovRatio || c.kl_cov_ratio), "aria-label": "KL-Cov ratio", oninput: () => { draft.value = input.value; } });
  const form = el(
    "form",
    {
      class: "ratio-form",
      onsubmit: (ev) => {
        ev.preventDefault();
        const r = Number(input.value);
        if (r > 0 && r <= 1) onRatio(r);
      },
    },
    el("label", { for: "kl-cov-ratio", text: "KL-Cov ratio" }),
    input,
    el("button", { type: "submit", text: "apply" }),
    el("span", { class: "sub", text: `verl's default ${VERL_KL_COV_RATIO} picks max(1, ⌊${c.num_tokens} × ratio⌋) = ${Math.max(1, Math.floor(c.num_tokens * VERL_KL_COV_RATIO))} token(s) here` }),
  );
  const link = (id, text) => el("a", { href: sequenceHref(runId, step, id, t, klCovRatio), text });
  const columns = [
    { key: "sequence_id", label: "sequence", fmt: (v) => link(v, v) },
    { key: "position", label: "position", num: true },
    { key: "token", label: "token", fmt: (_, r) => el("a", { class: "tok-cell", href: sequenceHref(runId, step, r.sequence_id, t, klCovRatio), title: tokenTitle(r, unit), text: tokenText(r) }) },
    { key: "share", label: `share (${unit})`, num: true, fmt: (v) => el("span", { class: `share-${shareSide(v)}`, text: fmt(v) }) },
    { key: "cov_score", label: "covariance score", num: true, fmt: (v) => fmt(v) },
  ];
  const side = (name, rows, title) =>
    el("div", { class: "tokens-side", "data-side": name }, el("h4", { text: title }), el("div", { class: "table-scroll" }, sortableTable(rows, columns, sorts[name])));
  box.replaceChildren(
    el("h3", { text: "Tokens that move the entropy" }),
    el("p", { class: "sub", text: `exact share a_{i,t} of each update token in dH1 (docs/math.md §9): ${tokens.num_tokens} tokens of ${tokens.num_sequences} sequences summing to ${fmt(tokens.total)} ${unit} (estimator ${tokens.estimator}). Negative pushes entropy down. Click a sequence or a token to see the sequence's tokens.` }),
    form,
    el("h4", { text: "Cui et al.'s covariance against the shares" }),
    el(
      "div",
      { class: "kpis" },
      covarianceKpis(c, unit).map((k) =>
        el("div", { class: "kpi", "data-kpi": k.key, "data-value": isNum(k.value) ? k.value : null }, el("div", { class: "kpi-v" }, k.text), el("div", { class: "kpi-k", text: k.label }), k.note ? el("div", { class: "kpi-n", text: k.note }) : null),
      ),
    ),
    el("div", { class: "tokens-tables" }, side("down", tokens.down, `pushing entropy down most (${tokens.down.length})`), side("up", tokens.up, `pushing entropy up most (${tokens.up.length})`)),
  );
  if (focused) input.focus();
}
