/* #/ : every run with its sketch spec and its last step. */
import { ApiError, getRun, listRuns } from "./api.js";
import { el, isNum, sortableTable, when } from "./dom.js";

const enc = encodeURIComponent;

/** "gaussian k=64 seed=7, groups: attn (k=6)" from a Run (api.js). */
export function specText(run) {
  const s = run.sketch;
  // groups: null, or a list (empty when posted so)
  const groups = s.groups && s.groups.length ? `, groups: ${s.groups.map((g) => `${g.name} (k=${g.dim})`).join(", ")}` : "";
  return `${s.kind} k=${run.k} seed=${s.seed}${groups}`;
}

/** The RunDetail of a listed run, or null when it was deleted since the list was read. */
async function detailOf(run) {
  try {
    return await getRun(run.run_id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}

/** Runs list; `frame`: {view, setCrumbs} of the entry module. */
export function runsPage(frame) {
  frame.setCrumbs([{ label: "runs" }]);
  const box = el("section", { class: "card" }, el("h2", { text: "Runs" }), el("p", { class: "empty", text: "loading…" }));
  frame.view.replaceChildren(box);
  const runsSort = { key: "created", dir: "desc" };
  let sig = "";
  return {
    async refresh() {
      const details = (await Promise.all((await listRuns()).map(detailOf))).filter(Boolean);
      const next = JSON.stringify(details);
      if (next === sig) return;
      sig = next;
      if (!details.length) {
        box.replaceChildren(el("h2", { text: "Runs" }), el("p", { class: "empty", text: "No runs yet. Start one with `kernelscope demo` or POST /v1/runs." }));
        return;
      }
      const rows = details.map((d) => {
        const last = d.steps.length ? d.steps.reduce((a, b) => (b.step > a.step ? b : a)) : null;
        return { run: d.run_id, spec: specText(d), normalization: d.normalization, geometry: d.geometry, steps: d.steps.length, last: last ? last.step : null, state: last ? last.state : "–", created: d.created_at };
      });
      box.replaceChildren(
        el("h2", { text: "Runs" }),
        sortableTable(
          rows,
          [
            { key: "run", label: "run", fmt: (v) => el("a", { href: `#/runs/${enc(v)}`, text: v }) },
            { key: "spec", label: "sketch" },
            { key: "normalization", label: "normalization" },
            { key: "geometry", label: "geometry" },
            { key: "steps", label: "steps", num: true },
            { key: "last", label: "last step", num: true, fmt: (v, r) => (isNum(v) ? el("a", { href: `#/runs/${enc(r.run)}/steps/${v}`, text: v }) : "–") },
            { key: "state", label: "last state", fmt: (v) => el("span", { class: `state ${v}`, text: v }) },
            { key: "created", label: "created", num: true, fmt: when },
          ],
          runsSort,
        ),
      );
    },
  };
}
