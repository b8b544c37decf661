/* #/runs/{run_id}/steps/{step}?target=&kl_cov_ratio= : one step: its status, its entropy
 * numbers, the spectrum, the diagonal and the prompt heatmaps of K, the decomposition of dH1,
 * the sequences that drive it and, when the trainer pushed token shares, the tokens that move
 * the entropy with Cui et al.'s covariance against them (tokens.js).  The entropy numbers are
 * about the page's target (the sequence entropy H or the token-mean entropy T, entropy.js),
 * chosen by its switch; the kernel's are the same for both.
 */
import { getBlocks, getDiagonal, getSpectrum, getStep, getStepEntropy, getTokens } from "./api.js";
import { COLORS, chartCard, hbars, heatmap, histogram, xyChart } from "./chart.js";
import { el, fmt, fmtPct, isNum, sortableTable } from "./dom.js";
import { KL_FIRST_ORDER, KL_SECOND_ORDER, flatRow, pmText, ratioText, regimeLabel, regimeNote, seTotal, targetHref, targetSwitch } from "./entropy.js";
import { drawTokensCard } from "./tokens.js";

const enc = encodeURIComponent;
const ZERO_EIGENVALUE = 1e-10; // relative to the largest eigenvalue
// the seconds an analysis may wait for its step: the status said ready, so only a race with a
// new upload makes it wait
const WAIT_S = 10;

/** "A > 0, S above prompt mean": the words of a Quadrant's advantage sign and log-prob side. */
const QUADRANT_ADVANTAGE = { positive: "A > 0", negative: "A ≤ 0" };
const QUADRANT_LOGPROB = { above_mean: "S above prompt mean", below_mean: "S ≤ prompt mean" };
const quadrantLabel = (q) => `${QUADRANT_ADVANTAGE[q.advantage]}, ${QUADRANT_LOGPROB[q.logprob]}`;

/** The realized change's line under its number: how it was obtained; `t`: the target. */
function realizedNote(real, t) {
  if (real === null) {
    if (t.key === "sequence") return "none yet: POST …/realized, or send logprob_after with the sequences";
    return "none: send entropy_sum and entropy_sum_after with logprob_after (a posted change is the sequence entropy's)";
  }
  if (real.source === "logprob_after" || real.source === "entropy_sum") {
    const from = real.source === "entropy_sum" ? "entropy_sum / entropy_sum_after and logprob_after" : "logprob_after";
    const levels = t.key === "sequence" ? "" : `; T ${fmt(real.entropy_before)} → ${fmt(real.entropy_after)} ${t.unit}`;
    const snis = isNum(real.delta_h_snis) ? `; self-normalised (SNIS) ${fmt(real.delta_h_snis)}, for comparison` : "";
    return `${real.estimator.replace(/_/g, " ")} estimate from ${from} over ${real.num_sequences} sequences, ${real.num_prompts} prompts${levels}${snis}`;
  }
  if (real.source === "posted") return "posted entropy_after − entropy_before, taken as exact (no s.e.)";
  return "given by the caller, taken as exact (no s.e.)";
}

/** The ratio's line under it: why it is flagged, or how its interval was made. */
function ratioNote(e, t) {
  const interval = e.ratio_interval;
  if (e.taylor.regime === "outside") return "the step is outside the Taylor regime: no ratio (see the regime)";
  if (interval === null) return "";
  if (isNum(e.ratio) && !interval.estimable) return `|${t.d1}| ≤ ${fmt(interval.z)} s.e.: realized / ${t.d1} = ${fmt(e.ratio)} would be noise`;
  if (isNum(interval.low)) return `Fieller interval at ±${fmt(interval.z)} s.e.; error correlation ${fmt(interval.correlation, 2)}`;
  return "";
}

/** The numbers at the top of the step page, from its EntropyOut (api.js), about target `t`. */
function stepKpis(e, t) {
  const real = e.realized;
  const taylor = e.taylor;
  const flat = flatRow(null, e);
  // T has no second-order term (docs/math.md §8): say so instead of a bare "–"
  const noSecond = t.d2 ? null : "not derived for the token-mean entropy (docs/math.md §8)";
  return [
    { key: "dh1", label: `${t.d1} ± 1 s.e. (predicted, ${t.per})`, value: e.delta_h1, se: seTotal(e), text: pmText(e.delta_h1, seTotal(e)), note: `estimator ${e.estimator}, grad ${t.symbol} from ${e.entropy_gradient === "entropy_sum" ? "the entropy sums" : "the score rows"}; s.e. sampling ${fmt(e.se_sampling)}, sketch ${fmt(e.se_sketch)}`, title: `first-order change of the ${t.name}, η <grad_hat ${t.symbol}, g_hat>` },
    { key: "realized", label: `realized ${t.delta} ± 1 s.e. (${t.per})`, value: flat.realized, se: flat.realized_se, text: pmText(flat.realized, flat.realized_se), note: realizedNote(real, t), title: `the change of the ${t.name} that happened (docs/math.md ${t.key === "sequence" ? "§6" : "§8"})` },
    { key: "ratio", label: `realized / ${t.d1} [2 s.e.]`, value: e.ratio, text: ratioText(flat), note: ratioNote(e, t), title: "1 = first order explains the whole change" },
    { key: "kl", label: "step size KL(π‖π′) ± 1 s.e. (nats)", value: taylor.kl, se: taylor.kl_se, text: pmText(taylor.kl, taylor.kl_se), note: `limits ${KL_FIRST_ORDER} nats (first order), ${KL_SECOND_ORDER} nats (second order)`, title: "KL of the policy after the step from the policy before, per prompt, averaged; from logprob_after" },
    { key: "regime", label: "Taylor regime", text: regimeLabel(taylor.regime), note: regimeNote(taylor.regime, taylor.reasons, t), title: "which prediction the step's size allows (docs/math.md §6)" },
    { key: "dh1-dh2", label: t.d2 ? `${t.d1} + ${t.d2} (second order, ${t.per})` : `second order (${t.per})`, value: e.delta_h1_plus_h2, text: fmt(e.delta_h1_plus_h2), note: noSecond ?? "compare with the realized change in the second-order regime", title: "first-order change along the applied update plus the curvature term" },
    { key: "applied", label: `${t.d1} applied update ± 1 s.e. (${t.per})`, value: e.delta_h1_applied, se: e.se_applied, text: pmText(e.delta_h1_applied, e.se_applied), note: "s.e. with the update held fixed (docs/math.md §4)", title: `<grad_hat ${t.symbol}, u> with the real update` },
    { key: "dh2", label: t.d2 ? `${t.d2} (second order, ${t.per})` : "second-order term", value: e.delta_h2, text: fmt(e.delta_h2), note: noSecond, title: "curvature term from logprob_after" },
    { key: "diag", label: `${t.d1} if K were diagonal (${t.per})`, value: e.delta_h1_diag, text: fmt(e.delta_h1_diag), title: "diagonal-kernel approximation" },
    { key: "baseline", label: "covariance baseline", value: e.cov_baseline, text: fmt(e.cov_baseline), title: "−(1/B) Σ_p Cov(S, A), Cui et al. 2025" },
    { key: "noise", label: "noise scale B_simple", value: e.noise_scale.b_simple, text: fmt(e.noise_scale.b_simple), title: "prompts" },
  ];
}

/**
 * A step: spectrum, heatmaps, diagonal, decomposition, sequence table; `frame`: {view,
 * setCrumbs}; `t`: the target (entropy.js TARGETS), which every entropy number is about.
 */
export function stepPage(frame, runId, step, t, klCovRatio = null) {
  frame.setCrumbs([{ label: "runs", href: "#/" }, { label: runId, href: targetHref(`/runs/${enc(runId)}`, t) }, { label: `step ${step}` }]);
  const switcher = targetSwitch(`/runs/${enc(runId)}/steps/${step}`, t);
  const head = el("section", { class: "card run-head" }, el("h2", { text: `Step ${step}` }), switcher, el("p", { class: "empty", text: "loading…" }));
  const summary = el("section", { class: "card wide summary" });
  const cSpec = el("section");
  const cDiag = el("section");
  const cHeatK = el("section");
  const cHeatR = el("section");
  const cPairs = el("section");
  const cQuad = el("section");
  const cGroups = el("section");
  const table = el("section", { class: "card wide" });
  const cTokens = el("section", { class: "card wide", hidden: true });
  frame.view.replaceChildren(head, el("div", { class: "grid" }, summary, cSpec, cDiag, cHeatK, cHeatR, cPairs, cQuad, cGroups, table, cTokens));
  const seqSort = { key: "contribution", dir: "asc" };
  const tokenSorts = { down: { key: "share", dir: "asc" }, up: { key: "share", dir: "desc" } };
  const ratioDraft = { value: null }; // a ratio typed, not applied: kept across redraws
  // a new ratio is a new address (a link reproduces the view); the hash change redraws the page
  const onRatio = (r) => {
    location.hash = `/runs/${enc(runId)}/steps/${step}?target=${t.key}&kl_cov_ratio=${r}`;
  };
  let statusSig = "";
  let data = null;

  function drawHead(status) {
    const errors = status.errors.map((e) => el("li", { text: `${e.upload_id}: ${e.error} (${e.attempts} attempts)` }));
    head.replaceChildren(
      ...[
      el("h2", {}, `Step ${step} `, el("span", { class: `state ${status.state}`, text: status.state })),
      switcher,
      el(
        "dl",
        { class: "facts" },
        el("dt", { text: "sequences" }), el("dd", { text: status.sequences }),
        el("dt", { text: "sketched rows" }), el("dd", { text: status.rows }),
        el("dt", { text: "queued uploads" }), el("dd", { text: status.pending_uploads }),
        el("dt", { text: "learning rate" }), el("dd", { text: fmt(status.learning_rate) }),
        el("dt", { text: "applied update" }), el("dd", { text: status.applied_update ? "yes" : "no" }),
      ),
      errors.length ? el("ul", { class: "error" }, errors) : null,
      ].filter(Boolean),
    );
  }

  function draw() {
    const { spectrum, blocks, diagonal, entropy, tokens } = data;
    cTokens.hidden = false;
    drawTokensCard(cTokens, tokens, { runId, step, t, klCovRatio, onRatio, sorts: tokenSorts, draft: ratioDraft });
    const e = entropy;
    summary.replaceChildren(
      el("h3", { text: `Change of the ${t.name} at this step (${t.per})` }),
      el("p", { class: "sub", text: "± 1 standard error (the run page's bars are ±2 s.e.); the ratio's interval is Fieller's at ±2 s.e. (docs/math.md §6). Hover a number for its definition." }),
      el(
        "div",
        { class: "kpis" },
        stepKpis(e, t).map((k) =>
          el(
            "div",
            { class: "kpi", title: k.title, "data-kpi": k.key, "data-value": isNum(k.value) ? k.value : null, "data-se": isNum(k.se) ? k.se : null },
            el("div", { class: "kpi-v" }, k.text),
            el("div", { class: "kpi-k", text: k.label }),
            k.note ? el("div", { class: "kpi-n", text: k.note }) : null,
          ),
        ),
      ),
    );

    const eig = spectrum.eigenvalues;
    // below 1e-10 of the largest an eigenvalue is rounding noise of a rank-deficient kernel
    const floor = Math.max(0, ...eig) * ZERO_EIGENVALUE;
    const positive = eig.map((v, i) => ({ x: i + 1, y: v, tip: `λ${i + 1} = ${fmt(v)}` })).filter((p) => p.y > floor);
    const zeros = eig.length - positive.length;
    xyChart(
      chartCard(cSpec, "spectrum", "Eigenvalue spectrum of K", `effective rank ${fmt(spectrum.effective_rank)}, participation ratio ${fmt(spectrum.participation_ratio)}, trace ${fmt(spectrum.trace)}${zeros ? `; ${zeros} zero eigenvalues (< 1e-10 λ₁) not drawn` : ""}`),
      {
        xLabel: "eigenvalue index (descending)",
        yLabel: "eigenvalue λ (log scale)",
        xInteger: true,
        logY: true,
        series: [{ name: "eigenvalues", label: "eigenvalues", color: COLORS.spectrum, line: true, points: positive }],
        vLines: [
          { x: spectrum.effective_rank, color: COLORS.realized, label: `effective rank ${fmt(spectrum.effective_rank)}` },
          { x: spectrum.participation_ratio, color: COLORS.applied, label: `participation ratio ${fmt(spectrum.participation_ratio)}` },
        ].filter((v) => isNum(v.x) && v.x > 0),
      },
    );
    histogram(chartCard(cDiag, "diagonal", "Diagonal of K", "squared norm of each sequence's score gradient"), {
      values: diagonal.map((d) => d.value),
      xLabel: "K(i,i) = |w_i|²",
      yLabel: "sequences",
    });
    const pm = blocks.prompt_matrix;
    heatmap(chartCard(cHeatK, "heat-k", "Mean kernel by prompt pair", "mean K(i,j) over pairs of the two prompts (i ≠ j within a prompt)"), { matrix: pm.mean_k, labels: pm.prompts, unit: "mean K" });
    heatmap(chartCard(cHeatR, "heat-rho", "Mean cosine by prompt pair", "mean ρ(i,j) = K(i,j)/√(K(i,i)K(j,j))"), { matrix: pm.mean_rho, labels: pm.prompts, unit: "mean cosine ρ", fixedMax: 1 });

    const dec = e.decomposition;
    const pairItems = ["diagonal", "same_prompt", "cross_prompt"].map((k) => {
      const { value, share } = dec.pair_types[k];
      return { label: k.replace("_", " "), value, note: isNum(share) ? `share ${fmtPct(share)}` : "" };
    });
    hbars(chartCard(cPairs, "pairs", `${t.d1} by pair type`, `contribution of sequence pairs (j, i) to ${t.d2 ? "h" : "h~"}^T K c`), { items: pairItems, xLabel: `contribution to ${t.d1} (${t.per})` });
    const quadItems = dec.quadrants.map((q) => ({ label: quadrantLabel(q), value: q.sum, note: `${q.count} seq.` }));
    hbars(chartCard(cQuad, "quadrants", `${t.d1} by kind of sequence`, "advantage sign × log-prob above/below its prompt's mean"), { items: quadItems, xLabel: `contribution to ${t.d1} (${t.per})` });
    // groups: null unless the run's sketch has parameter groups
    if (dec.groups) {
      cGroups.hidden = false;
      const groupItems = Object.entries(dec.groups).map(([name, value]) => ({ label: name, value }));
      hbars(chartCard(cGroups, "groups", `${t.d1} by parameter group`, "per-group kernels K = Σ_g K_g"), { items: groupItems, xLabel: `contribution to ${t.d1} (${t.per})` });
    } else {
      cGroups.hidden = true;
      cGroups.replaceChildren();
    }

    // a_i of an update row, b_j of an entropy row (under u_statistic, plugin and cross_fit an update row
    // is both: its a_i is what the update did with it)
    const seqs = e.per_sequence
      .map((p) => ({ id: p.id, role: p.role, prompt: p.prompt_id, advantage: p.advantage, logprob: p.logprob, tokens: p.num_tokens, contribution: p.a ?? p.b }))
      .filter((r) => isNum(r.contribution));
    seqs.sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution));
    const top = seqs.slice(0, 100);
    table.replaceChildren(
      el("h3", { text: "Sequences that drive entropy most" }),
      el("p", { class: "sub", text: `the ${top.length} of ${seqs.length} sequences with the largest |contribution| to ${t.d1}, in ${t.per} (a_i for update sequences, b_j for entropy sequences; negative = entropy collapse). Click a header to sort.` }),
      el(
        "div",
        { class: "table-scroll" },
        sortableTable(
          top,
          [
            { key: "id", label: "sequence" },
            { key: "role", label: "role" },
            { key: "prompt", label: "prompt" },
            { key: "advantage", label: "advantage", num: true, fmt: (v) => fmt(v) },
            { key: "logprob", label: "log-prob (nats)", num: true, fmt: (v) => fmt(v) },
            { key: "tokens", label: "length (tokens)", num: true },
            { key: "contribution", label: `contribution (${t.unit})`, num: true, fmt: (v) => el("span", { class: v < 0 ? "neg" : "pos", text: fmt(v) }) },
          ],
          seqSort,
        ),
      ),
    );
    table.dataset.chart = "sequences";
  }

  return {
    async refresh() {
      const status = await getStep(runId, step);
      const s = JSON.stringify(status);
      if (s === statusSig) return;
      drawHead(status);
      if (status.state !== "ready") {
        statusSig = s;
        if (!data) summary.replaceChildren(el("p", { class: "empty", text: status.state === "pending" ? "Waiting for the workers to sketch the queued uploads…" : "This step failed: see the errors above." }));
        return;
      }
      // the token shares only when the status counts some (a 404 would reach the console)
      const [spectrum, blocks, diagonal, entropy, tokens] = await Promise.all([
        getSpectrum(runId, step, WAIT_S),
        getBlocks(runId, step, WAIT_S),
        getDiagonal(runId, step, WAIT_S),
        getStepEntropy(runId, step, t.key, WAIT_S),
        status.token_sequences > 0 ? getTokens(runId, step, { klCovRatio }) : null,
      ]);
      data = { spectrum, blocks, diagonal, entropy, tokens };
      statusSig = s;
      draw();
    },
    redraw() {
      if (data) draw();
    },
  };
}
