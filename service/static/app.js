/* kernelscope dashboard: the entry module (index.html loads it as <script type="module">).
 *
 * A single page that reads only the public /v1 JSON API (api.js) and draws every chart as SVG
 * (chart.js; no third-party library, no network beyond this service).  Pages, by URL fragment:
 *   #/                          runs list (runs-page.js)
 *   #/runs/{run_id}             a run: entropy change over steps, ratio, noise scale (run-page.js)
 *   #/runs/{run_id}/steps/{s}   a step: spectrum, prompt heatmaps, diagonal histogram,
 *                               decomposition of dH1, the sequences that drive it, the
 *                               tokens that move the entropy (step-page.js, tokens.js)
 *   #/runs/{run_id}/steps/{s}/sequences/{id}
 *                               a sequence's tokens coloured by their share of dH1
 *                               (sequence-page.js)
 * The run and step pages take `?target=sequence|token_mean` after the fragment's path (or in
 * the query string, for a path-style link): which entropy their numbers are about (entropy.js);
 * the step and sequence pages take `kl_cov_ratio=` too (KL-Cov's fraction of tokens).
 * The current page polls the API every few seconds (`?poll=MS` overrides) and redraws only
 * when the data changed, so a running trainer's new steps appear without a reload.
 * Numbers are defined in docs/math.md.
 */
import { ApiError, dropStoredToken, setToken } from "./api.js";
import { el } from "./dom.js";
import { targetOf } from "./entropy.js";
import { runPage } from "./run-page.js";
import { runsPage } from "./runs-page.js";
import { sequencePage } from "./sequence-page.js";
import { stepPage } from "./step-page.js";

const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(250, Number(params.get("poll")) || 3000);

// A token left in an old `?token=` link is dropped from the address and not used: the token
// never travels in a URL (access logs, browser history).
if (params.has("token")) {
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
}
dropStoredToken();

const view = document.getElementById("view");
const crumbs = document.getElementById("crumbs");
const live = document.getElementById("live");
const tokenInput = document.getElementById("token-input");

/** What every page draws into: the main element and the breadcrumbs. */
const frame = {
  view,
  setCrumbs(parts) {
    crumbs.replaceChildren(
      ...parts.flatMap((p, i) => [i ? el("span", { class: "sep", text: "/" }) : null, p.href ? el("a", { href: p.href, text: p.label }) : el("span", { text: p.label })]).filter(Boolean),
    );
  },
};

let page = null;
let timer = null;

function showError(box, err) {
  if (err instanceof ApiError && err.status === 401) {
    box.replaceChildren(el("p", { class: "error", text: "This service needs an API token: enter it above (it is kept in this tab only, never in the address)." }));
    tokenInput.focus();
    return;
  }
  box.replaceChildren(el("p", { class: "error", text: `Could not load: ${err.message}` }));
}

function route() {
  const [hashPath, hashQuery = ""] = location.hash.replace(/^#/, "").split("?", 2);
  const path = hashPath || (location.pathname.startsWith("/runs/") ? location.pathname : "/");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const target = targetOf(hashQuery, location.search);
  // an unusable ratio is left to the service's default
  const ratio = Number(new URLSearchParams(hashQuery).get("kl_cov_ratio"));
  const klCovRatio = ratio > 0 && ratio <= 1 ? ratio : null;
  if (parts[0] === "runs" && parts.length >= 6 && parts[2] === "steps" && parts[4] === "sequences") return sequencePage(frame, parts[1], Number(parts[3]), parts[5], target, klCovRatio);
  if (parts[0] === "runs" && parts.length >= 4 && parts[2] === "steps") return stepPage(frame, parts[1], Number(parts[3]), target, klCovRatio);
  if (parts[0] === "runs" && parts.length >= 2) return runPage(frame, parts[1], target);
  return runsPage(frame);
}

async function tick() {
  clearTimeout(timer);
  const current = page;
  try {
    await current.refresh();
    if (current !== page) return;
    live.className = "live ok";
    live.textContent = `live · ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = String((Number(document.body.dataset.loaded) || 0) + 1);
  } catch (err) {
    if (current !== page) return;
    live.className = "live bad";
    live.textContent = "not updating";
    showError(view.firstElementChild || view, err);
  }
  if (current === page) timer = setTimeout(tick, POLL_MS);
}

function start() {
  page = route();
  tick();
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken(tokenInput.value);
  tokenInput.value = "";
  start();
});
window.addEventListener("hashchange", start);
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => page && page.redraw && page.redraw(), 150);
});
start();
