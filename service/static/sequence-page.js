/* #/runs/{run_id}/steps/{step}/sequences/{id}?target=&kl_cov_ratio= : one update sequence's
 * response, token by token, each token coloured by its exact share of the step's dH1 (tokens.js:
 * vermillion pushes entropy down, blue up, on a scale symmetric about 0 reaching the step's
 * largest |share|, so two sequences of a step compare), with its Cui et al. covariance score as
 * a bar under it and every number on hover.
 */
import { el, fmt } from "./dom.js";
import { targetHref } from "./entropy.js";
import { shareColor, shareLegend, shareScale, shareSide, tokenText, tokenTitle, tokensOrNull } from "./tokens.js";

const enc = encodeURIComponent;
const COV_BAR_PX = 12; // the bar of the sequence's largest |covariance score|

/** One token: its text on its share's colour, its covariance score as a bar below (span.tok). */
function tokenCell(t, max, maxCov, unit) {
  const text = el("span", { class: `tok-text${t.token === null ? " no-text" : ""}`, text: tokenText(t) });
  text.style.setProperty("--c", shareColor(t.share, max));
  const bar = el("span", { class: `cov-bar ${t.cov_score < 0 ? "negative" : "positive"}` });
  bar.style.setProperty("--h", `${maxCov > 0 ? (COV_BAR_PX * Math.abs(t.cov_score)) / maxCov : 0}px`);
  return el(
    "span",
    { class: "tok", title: tokenTitle(t, unit), "data-position": t.position, "data-share": t.share, "data-cov": t.cov_score, "data-side": shareSide(t.share) },
    text,
    el("span", { class: "cov-lane" }, bar),
  );
}

/** A sequence's tokens; `frame`: {view, setCrumbs}; `t`: the page's target; `klCovRatio`: or null. */
export function sequencePage(frame, runId, step, sequenceId, t, klCovRatio) {
  const stepPath = `/runs/${enc(runId)}/steps/${step}`;
  frame.setCrumbs([
    { label: "runs", href: "#/" },
    { label: runId, href: targetHref(`/runs/${enc(runId)}`, t) },
    { label: `step ${step}`, href: targetHref(stepPath, t) },
    { label: `sequence ${sequenceId}` },
  ]);
  const card = el("section", { class: "card sequence-view", "data-card": "sequence" }, el("h2", { text: `Sequence ${sequenceId}` }), el("p", { class: "empty", text: "loading…" }));
  frame.view.replaceChildren(card);
  let sig = "";
  let data = null;

  function draw() {
    const tokens = data;
    if (tokens === null) {
      card.replaceChildren(el("h2", { text: `Sequence ${sequenceId}` }), el("p", { class: "empty", text: `Step ${step} has no token shares of sequence ${sequenceId}.` }));
      return;
    }
    const unit = tokens.target === "token_mean" ? "nats/token" : "nats";
    const seq = tokens.sequence || [];
    const max = shareScale(tokens, seq);
    const maxCov = Math.max(0, ...seq.map((x) => Math.abs(x.cov_score)));
    const total = tokens.sequences.find((s) => s.id === sequenceId);
    const sum = seq.reduce((acc, x) => acc + x.share, 0);
    card.replaceChildren(
      el("h2", { text: `Sequence ${sequenceId}` }),
      el("p", { class: "sub", text: `${seq.length} tokens${total ? ` of prompt ${total.prompt_id}` : ""}; their shares sum to ${fmt(total ? total.total : sum)} ${unit} (its a_i) of the step's ${fmt(tokens.total)}. Colour: the token's exact share of dH1 (docs/math.md §9); bar under it: its covariance score (filled ≥ 0, outlined < 0; the tallest is ${fmt(maxCov)}). Hover a token for its numbers.` }),
      shareLegend(max, unit),
      el("div", { class: "tokens-text" }, seq.map((x) => tokenCell(x, max, maxCov, unit))),
    );
  }

  return {
    async refresh() {
      // top=1: the step's extremes set the colour scale; the sequence comes whole
      const tokens = await tokensOrNull(runId, step, { top: 1, sequence: sequenceId, klCovRatio });
      const s = JSON.stringify(tokens);
      if (s === sig) return;
      sig = s;
      data = tokens;
      draw();
    },
    redraw() {
      if (sig) draw();
    },
  };
}
