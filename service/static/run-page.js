/* #/runs/{run_id}?target= : a run over its steps: predicted against realized entropy change,
 * their ratio, the step size KL(π‖π′), the step length, the noise scale, the covariance
 * baseline, and a table of the steps.  The entropy numbers are about the page's target (the
 * sequence entropy H or the token-mean entropy T, entropy.js), chosen by its switch.
 */
import { ApiError, getRun, getRunEntropy, getStepEntropy } from "./api.js";
import { COLORS, chartCard, xyChart } from "./chart.js";
import { el, fmt, isNum, sortableTable, when } from "./dom.js";
import { KL_FIRST_ORDER, KL_SECOND_ORDER, flatRow, pmText, ratioShown, ratioText, regimeLabel, regimeNote, seTotal, targetHref, targetSwitch } from "./entropy.js";
import { specText } from "./runs-page.js";

const enc = encodeURIComponent;

/** The steps table's row of a step that has no analysis yet. */
const NO_ANALYSIS = { delta_h1: null, realized: null, realized_se: null, realized_source: null, ratio: null, ratio_estimable: null, kl: null, kl_se: null, regime: null, regime_reasons: [], cov_baseline: null };

/**
 * A run: entropy over steps, ratio, step size, noise scale, steps table; `frame`: {view,
 * setCrumbs}; `t`: the target (entropy.js TARGETS), which every entropy number is about.
 */
export function runPage(frame, runId, t) {
  frame.setCrumbs([{ label: "runs", href: "#/" }, { label: runId }]);
  const switcher = targetSwitch(`/runs/${enc(runId)}`, t);
  const head = el("section", { class: "card run-head" }, el("h2", { text: `Run ${runId}` }), switcher, el("p", { class: "empty", text: "loading…" }));
  const cEntropy = el("section", { class: "wide" });
  const cRatio = el("section");
  const cKl = el("section");
  const cStepNorm = el("section");
  const cNoise = el("section");
  const cBaseline = el("section", { class: "wide" });
  const steps = el("section", { class: "card wide" });
  frame.view.replaceChildren(head, el("div", { class: "grid" }, cEntropy, cRatio, cKl, cStepNorm, cNoise, cBaseline, steps));
  const stepsSort = { key: "step", dir: "desc" };
  const stepCache = new Map(); // step -> {key, row}: the last full analysis of each step
  const stepKey = (s) => `${s.rows}|${s.sequences}|${s.uploads}|${s.pending_uploads}|${s.learning_rate}|${s.applied_update}`;
  let sig = "";
  let lastData = null;

  /** ± 2 s.e. around v, or no bar when the s.e. is unknown. */
  const bar2 = (v, se) => (isNum(v) && isNum(se) ? { lo: v - 2 * se, hi: v + 2 * se } : {});

  function drawEntropy(rows) {
    const realizedFrom = t.key === "sequence" ? "when it is estimated from logprob_after (a posted change has none)" : "from the sequences' entropy_sum / entropy_sum_after with logprob_after (none without them)";
    const second = t.d2 ? `; the second-order prediction ${t.d1} + ${t.d2}` : " (no second-order term is derived for T)";
    const body = chartCard(cEntropy, "entropy", `Change of the ${t.name} per step: predicted against realized (${t.per})`, `predicted ${t.d1} with ±2 s.e. bars (sampling and sketch error combined); the realized change with ±2 s.e. bars ${realizedFrom}; ${t.d1} along the update the optimizer really applied${second}`);
    xyChart(body, {
      xLabel: "step",
      yLabel: `entropy change ${t.delta} (${t.per})`,
      xInteger: true,
      height: 280,
      errClip: 1,
      refLines: [{ y: 0, color: "#999" }],
      series: [
        { name: "predicted", label: `predicted ${t.d1} ± 2 s.e.`, color: COLORS.predicted, line: true, points: rows.map((r) => ({ x: r.step, y: r.delta_h1, lo: r.delta_h1 - 2 * seTotal(r), hi: r.delta_h1 + 2 * seTotal(r), tip: `step ${r.step}: ${t.d1} = ${fmt(r.delta_h1)} ± ${fmt(seTotal(r))} ${t.unit} (${r.estimator})` })) },
        {
          name: "realized",
          label: `realized ${t.delta} ± 2 s.e.`,
          color: COLORS.realized,
          line: true,
          points: rows.map((r) => ({
            x: r.step,
            y: r.realized,
            ...bar2(r.realized, r.realized_se),
            tip: `step ${r.step}: realized ${t.delta} = ${fmt(r.realized)}${isNum(r.realized_se) ? ` ± ${fmt(r.realized_se)}` : ""} ${t.unit} (${r.realized_source})`,
          })),
        },
        { name: "applied", label: `${t.d1} of the applied update`, color: COLORS.applied, line: true, dash: true, points: rows.map((r) => ({ x: r.step, y: r.delta_h1_applied, tip: `step ${r.step}: ${t.d1} of the applied update = ${fmt(r.delta_h1_applied)} ${t.unit}` })) },
        { name: "second-order", label: `${t.d1} + ${t.d2} (second order)`, color: COLORS.second, line: true, dash: true, radius: 2.5, points: rows.map((r) => ({ x: r.step, y: r.delta_h1_plus_h2, tip: `step ${r.step}: ${t.d1} + ${t.d2} = ${fmt(r.delta_h1_plus_h2)} ${t.unit}` })) },
      ],
      empty: "no analysed step yet",
    });
  }

  function drawRatio(rows) {
    const shown = rows.filter((r) => isNum(ratioShown(r)));
    const tipOf = (r) => `step ${r.step}: realized / ${t.d1} = ${ratioText(r)}`;
    const ratioPoint = (r) => ({ x: r.step, y: r.ratio, lo: r.ratio_low, hi: r.ratio_high, tip: tipOf(r) });
    const squares = t.d2 ? `compare ${t.d1} + ${t.d2}` : `${t.d1} may miss part of the change`;
    const body = chartCard(cRatio, "ratio", `Realized / predicted (${t.name})`, `realized ${t.delta} / ${t.d1} with its Fieller interval at ±2 s.e.; 1 = first order explains all of it; squares: second-order regime (${squares}); in the strip under the plot: the ratio is not estimable (|${t.d1}| ≤ 2 s.e.: noise) or the step is outside the Taylor regime`);
    xyChart(body, {
      xLabel: "step",
      yLabel: `realized ${t.delta} / ${t.d1} (ratio)`,
      xInteger: true,
      errClip: 1.5,
      yInclude: [0, 2],
      refLines: [{ y: 1, color: "#999", label: "ratio 1" }],
      series: [
        { name: "ratio", label: "ratio ± 2 s.e.", color: COLORS.ratio, points: shown.filter((r) => r.regime !== "second_order").map(ratioPoint) },
        { name: "ratio-second-order", label: "ratio, 2nd-order regime", color: COLORS.ratio, shape: "square", points: shown.filter((r) => r.regime === "second_order").map(ratioPoint) },
        { name: "not-estimable", label: "not estimable", color: COLORS.notEstimable, flag: true, points: rows.filter((r) => r.regime !== "outside" && isNum(r.ratio) && r.ratio_estimable === false).map((r) => ({ x: r.step, tip: `step ${r.step}: ratio not estimable, |${t.d1}| = ${fmt(Math.abs(r.delta_h1))} ≤ 2 s.e. = ${fmt(2 * seTotal(r))} (realized / ${t.d1} would read ${fmt(r.ratio)})` })) },
        { name: "outside", label: "outside Taylor regime", color: COLORS.outside, flag: true, shape: "diamond", points: rows.filter((r) => r.regime === "outside").map((r) => ({ x: r.step, tip: `step ${r.step}: outside the Taylor regime${r.regime_reasons.length ? ` (${r.regime_reasons.join("; ")})` : ""}` })) },
      ],
      empty: t.key === "sequence" ? "no step with a realized change yet (POST …/realized or logprob_after)" : "no step with a realized change of T yet (entropy_sum and entropy_sum_after with logprob_after)",
    });
  }

  function drawKl(rows) {
    const kls = rows.map((r) => r.kl).filter((v) => isNum(v) && v > 0);
    const logY = kls.length === rows.filter((r) => isNum(r.kl)).length && kls.length > 0 && Math.max(KL_SECOND_ORDER, ...kls) / Math.min(KL_FIRST_ORDER, ...kls) > 30;
    const upToSecond = t.d2 ? `compare ${t.d1} + ${t.d2}` : `${t.d1} may miss part of the change (no second-order term for T)`;
    const body = chartCard(cKl, "kl", "Step size KL(π‖π′)", `KL of the policy after the step from the policy before, per prompt and averaged (nats, from logprob_after; the same under both targets), ±2 s.e.; up to ${KL_FIRST_ORDER} nats ${t.d1} alone should match the realized change, up to ${KL_SECOND_ORDER} ${upToSecond}, beyond it no Taylor prediction holds`);
    xyChart(body, {
      xLabel: "step",
      yLabel: `KL(π‖π′) (nats${logY ? ", log scale" : ""})`,
      xInteger: true,
      logY,
      errClip: 1,
      refLines: [
        { y: KL_FIRST_ORDER, color: COLORS.firstLimit, label: `first-order limit ${KL_FIRST_ORDER}` },
        { y: KL_SECOND_ORDER, color: COLORS.secondLimit, label: `second-order limit ${KL_SECOND_ORDER}` },
      ],
      series: [
        {
          name: "kl",
          label: "KL ± 2 s.e.",
          color: COLORS.kl,
          line: true,
          points: rows.map((r) => ({ x: r.step, y: r.kl, ...bar2(r.kl, r.kl_se), tip: `step ${r.step}: KL = ${fmt(r.kl)}${isNum(r.kl_se) ? ` ± ${fmt(r.kl_se)}` : ""} nats, ${regimeLabel(r.regime)}` })),
        },
      ],
      empty: "no step with logprob_after yet: the step's size needs the log-probs after the update",
    });
  }

  function draw() {
    const { run, rows } = lastData;
    head.replaceChildren(
      el("h2", { text: `Run ${runId}` }),
      switcher,
      el(
        "dl",
        { class: "facts" },
        el("dt", { text: "sketch" }), el("dd", { text: specText(run) }),
        el("dt", { text: "normalization" }), el("dd", { text: run.normalization }),
        el("dt", { text: "geometry" }), el("dd", { text: run.geometry }),
        el("dt", { text: "steps" }), el("dd", { text: run.steps.length }),
        el("dt", { text: "created" }), el("dd", { text: when(run.created_at) }),
      ),
    );
    const pts = (key, f = (r) => r[key]) => rows.map((r) => ({ x: r.step, y: f(r) }));
    drawEntropy(rows);
    xyChart(chartCard(cBaseline, "baseline", "Covariance baseline (Cui et al. 2025)", `−(1/B) Σ_p Cov(S, A): the sequence-entropy dynamics with an identity kernel, no learning rate, the same for both targets; compare its sign and trend with ${t.d1}`), {
      xLabel: "step",
      yLabel: "−mean Cov(S, A) (nats × adv.)",
      xInteger: true,
      refLines: [{ y: 0, color: "#999" }],
      series: [{ name: "baseline", label: "covariance baseline", color: COLORS.baseline, line: true, points: pts("cov_baseline") }],
      empty: "no step with update sequences yet",
    });
    const norms = pts("step_norm").filter((p) => isNum(p.y) && p.y > 0);
    const normLog = norms.length > 1 && Math.max(...norms.map((p) => p.y)) / Math.min(...norms.map((p) => p.y)) > 20;
    xyChart(chartCard(cStepNorm, "step-norm", "Step length in the sketch", "η·|ĝ|, the length of the predicted update; second-order effects grow with it (the step's size in the policy is KL(π‖π′))"), {
      xLabel: "step",
      yLabel: "η·|ĝ| (sketch norm)",
      xInteger: true,
      logY: normLog,
      series: [{ name: "step-norm", label: "η·|ĝ|", color: COLORS.predicted, line: true, points: norms }],
      empty: "no analysed step yet",
    });
    drawRatio(rows);
    drawKl(rows);
    const noise = pts("b_simple");
    const pos = noise.filter((p) => isNum(p.y));
    const logY = pos.length > 1 && pos.every((p) => p.y > 0) && Math.max(...pos.map((p) => p.y)) / Math.min(...pos.map((p) => p.y)) > 20;
    const missing = noise.length - pos.length;
    const noiseSub = `B_simple = tr(Σ) / |G|² with prompt groups as units (McCandlish et al. 2018)${missing ? `; ${missing} of ${noise.length} steps not estimable (|G|² ≤ 0 or one prompt)` : ""}`;
    xyChart(chartCard(cNoise, "noise", "Gradient noise scale", noiseSub), {
      xLabel: "step",
      yLabel: "B_simple (prompts)",
      xInteger: true,
      logY,
      series: [{ name: "noise", label: "B_simple", color: COLORS.noise, line: true, points: noise }],
      empty: "not estimable yet (needs at least 2 prompts with a signal)",
    });
    drawSteps(run, rows);
  }

  function drawSteps(run, rows) {
    const byStep = new Map(rows.map((r) => [r.step, r]));
    const tableRows = run.steps.map((s) => {
      const r = byStep.get(s.step) ?? NO_ANALYSIS;
      return {
        step: s.step,
        state: s.state,
        sequences: s.sequences,
        rows: s.rows,
        pending: s.pending_uploads,
        dh1: r.delta_h1,
        se: isNum(r.delta_h1) ? seTotal(r) : null,
        realized: r.realized,
        realized_se: r.realized_se,
        realized_source: r.realized_source,
        ratio: ratioShown(r),
        ratio_text: isNum(r.delta_h1) ? ratioText(r) : "–",
        kl: r.kl,
        kl_se: r.kl_se,
        regime: r.regime,
        regime_reasons: r.regime_reasons,
        baseline: r.cov_baseline,
      };
    });
    steps.dataset.chart = "steps";
    steps.replaceChildren(
      el("h3", { text: "Steps" }),
      el("p", { class: "sub", text: `changes of the ${t.name} in ${t.per}, KL(π‖π′) in nats; realized and KL ± 1 s.e.; ratio: realized / ${t.d1} with its Fieller interval at 2 s.e.; “not estimable”: |${t.d1}| ≤ 2 s.e.; “outside Taylor”: KL(π‖π′) > 0.3, too large a step for a Taylor prediction; “(2nd order)”: ${t.d2 ? `compare ${t.d1} + ${t.d2}` : `${t.d1} may miss part of the change`} (docs/math.md §6, §8). Click a header to sort.` }),
      el(
        "div",
        { class: "table-scroll" },
        sortableTable(
          tableRows,
          [
            { key: "step", label: "step", num: true, fmt: (v) => el("a", { href: targetHref(`/runs/${enc(runId)}/steps/${v}`, t), text: v }) },
            { key: "state", label: "state", fmt: (v) => el("span", { class: `state ${v}`, text: v }) },
            { key: "sequences", label: "sequences", num: true },
            { key: "rows", label: "rows", num: true },
            { key: "pending", label: "queued", num: true, title: "queued uploads; sort by them" },
            { key: "dh1", label: `${t.d1} (${t.unit})`, num: true, fmt: (v) => fmt(v) },
            { key: "se", label: "s.e.", num: true, fmt: (v) => fmt(v) },
            { key: "realized", label: `realized ${t.delta} ± s.e.`, num: true, fmt: (v, r) => el("span", { title: r.realized_source ? `source: ${r.realized_source}` : null }, pmText(v, r.realized_se)) },
            { key: "ratio", label: `realized / ${t.d1} [2 s.e.]`, num: true, fmt: (v, r) => el("span", { class: isNum(v) ? null : "flagged" }, r.ratio_text) },
            { key: "kl", label: "KL(π‖π′) ± s.e.", num: true, fmt: (v, r) => pmText(v, r.kl_se) },
            { key: "regime", label: "regime", fmt: (v, r) => el("span", { class: `regime ${v || "none"}`, title: v ? regimeNote(v, r.regime_reasons, t) : null, text: regimeLabel(v) }) },
            { key: "baseline", label: "cov. baseline", num: true, fmt: (v) => fmt(v) },
          ],
          stepsSort,
        ),
      ),
    );
  }

  return {
    async refresh() {
      const [run, history] = await Promise.all([getRun(runId), getRunEntropy(runId, t.key)]);
      const summaries = new Map(history.steps.map((r) => [r.step, r]));
      // the history's rows have no covariance baseline, noise scale or step length: ask each
      // ready step for its full answer (the server caches it by data version), again when its
      // status changes, and always the newest few (a realized change may arrive late)
      const ready = run.steps.filter((s) => s.state === "ready").sort((a, b) => a.step - b.step);
      const newest = new Set(ready.slice(-3).map((s) => s.step));
      const todo = ready
        .filter((s) => {
          const hit = stepCache.get(s.step);
          return !hit || hit.key !== stepKey(s) || newest.has(s.step);
        })
        .slice(-200);
      for (let i = 0; i < todo.length; i += 4) {
        await Promise.all(
          todo.slice(i, i + 4).map(async (s) => {
            try {
              stepCache.set(s.step, { key: stepKey(s), row: flatRow(s.step, await getStepEntropy(runId, s.step, t.key, 5)) });
            } catch (err) {
              // a step that cannot be analysed (409: new uploads queued since its status was
              // read; 422: e.g. no update rows) keeps its history row, if any, as the server does
              if (!(err instanceof ApiError && (err.status === 409 || err.status === 422))) throw err;
              stepCache.set(s.step, { key: stepKey(s), row: null });
            }
          }),
        );
      }
      const steps = new Set([...summaries.keys(), ...stepCache.keys()]);
      // the step's own answer wins over the history row (the same fields, and a few more)
      const rows = [...steps]
        .sort((a, b) => a - b)
        .map((step) => stepCache.get(step)?.row ?? summaries.get(step))
        .filter(Boolean);
      const next = JSON.stringify([run, rows]);
      if (next === sig) return;
      sig = next;
      lastData = { run, rows };
      draw();
    },
    redraw() {
      if (lastData) draw();
    },
  };
}
