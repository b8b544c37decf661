/* kernelscope dashboard.
 *
 * A single page that reads only the public /v1 JSON API and draws every chart as SVG (no
 * third-party library, no network beyond this service).  Pages, by URL fragment:
 *   #/                          runs list
 *   #/runs/{run_id}             a run: entropy change over steps, ratio, noise scale
 *   #/runs/{run_id}/steps/{s}   a step: spectrum, prompt heatmaps, diagonal histogram,
 *                               decomposition of dH1, the sequences that drive it
 * The current page polls the API every few seconds (`?poll=MS` overrides) and redraws only
 * when the data changed, so a running trainer's new steps appear without a reload.
 * Numbers are defined in docs/math.md.
 */
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.max(250, Number(params.get("poll")) || 3000);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ZERO_EIGENVALUE = 1e-10; // relative to the largest eigenvalue
  const COLORS = {
    predicted: "#0072B2",
    realized: "#D55E00",
    applied: "#009E73",
    baseline: "#7f7f7f",
    diag: "#E69F00",
    ratio: "#CC79A7",
    noise: "#009E73",
    spectrum: "#0072B2",
    hist: "#56B4E9",
    pos: "#D55E00",
    neg: "#0072B2",
    second: "#E69F00",
    kl: "#0072B2",
    firstLimit: "#009E73",
    secondLimit: "#D55E00",
    notEstimable: "#7f7f7f",
    outside: "#D55E00",
  };
  // KL(π‖π′) thresholds of the Taylor regimes, nats (sketch/taylor.py, docs/math.md §6)
  const KL_FIRST_ORDER = 0.03;
  const KL_SECOND_ORDER = 0.3;

  // ---------------------------------------------------------------- token and API access
  // The token never travels in a URL (access logs, browser history): it is typed into the
  // field and kept in this tab's session storage. A token left in an old `?token=` link is
  // dropped from the address and not used.
  const TOKEN_KEY = "kernelscope.token";
  if (params.has("token")) {
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
  }
  localStorage.removeItem(TOKEN_KEY); // where earlier versions kept it
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  class ApiError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.title)) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  /** GET a /v1 JSON resource; throws ApiError on a non-2xx answer. */
  async function api(path) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const res = await fetch(path, { headers, cache: "no-store" });
    const text = await res.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_e) {
      body = { detail: text.slice(0, 200) };
    }
    if (!res.ok) throw new ApiError(res.status, body);
    return body;
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- small helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    if (parent) parent.append(node);
    return node;
  }

  function tip(node, text) {
    svg("title", { text }, node);
    return node;
  }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);

  /** A short, readable number: 3 significant digits, exponent form for very small/large. */
  function fmt(v, digits = 3) {
    if (!isNum(v)) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) {
      const [m, e] = v.toExponential(digits - 1).split("e");
      return `${m.replace(/\.?0+$/, "")}e${Number(e)}`;
    }
    return String(Number(v.toPrecision(digits)));
  }

  function fmtPct(v) {
    return isNum(v) ? `${(100 * v).toFixed(1)} %` : "–";
  }

  const textWidth = (s, size = 11) => String(s).length * size * 0.6;

  /** Evenly spaced round ticks covering [lo, hi]. */
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) {
      const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
      lo -= pad;
      hi += pad;
    }
    const raw = (hi - lo) / Math.max(1, count);
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const start = Math.floor(lo / step) * step;
    const end = Math.ceil(hi / step) * step;
    const ticks = [];
    for (let t = start; t <= end + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return { ticks, lo: start, hi: end, step };
  }

  /** Powers of ten covering [lo, hi] (both > 0), thinned to at most `count` labels. */
  function logTicks(lo, hi, count) {
    const a = Math.floor(Math.log10(lo));
    const b = Math.ceil(Math.log10(hi));
    const every = Math.max(1, Math.ceil((b - a) / Math.max(1, count)));
    const ticks = [];
    for (let e = a; e <= b; e += every) ticks.push(10 ** e);
    return { ticks, lo: 10 ** a, hi: 10 ** Math.max(b, a + 1) };
  }

  // ---------------------------------------------------------------- chart frame
  const chartIds = { n: 0 };

  /** Replace the contents of `box` with a titled chart card; returns the body element. */
  function chartCard(box, name, title, subtitle) {
    box.replaceChildren();
    box.dataset.chart = name;
    box.classList.add("card", "chart");
    box.append(el("h3", { text: title }));
    if (subtitle) box.append(el("p", { class: "sub", text: subtitle }));
    const body = el("div", { class: "chart-body" });
    box.append(body);
    return body;
  }

  function legend(items) {
    return el(
      "div",
      { class: "legend" },
      items.map((it) =>
        el(
          "span",
          { class: "legend-item" },
          el("span", {
            class: `swatch ${it.kind || "dot"}`,
            style: `--c:${it.color}`,
          }),
          it.label,
        ),
      ),
    );
  }

  function emptyNote(body, text) {
    body.append(el("p", { class: "empty", text }));
  }

  /** A marker of `shape` (circle, square, diamond) centred on (x, y); circles stay <circle>. */
  function marker(parent, shape, x, y, r, attrs) {
    if (shape === "square") return svg("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, ...attrs }, parent);
    if (shape === "diamond") {
      const a = r * 1.35;
      return svg("path", { d: `M${x},${y - a}L${x + a},${y}L${x},${y + a}L${x - a},${y}Z`, ...attrs }, parent);
    }
    return svg("circle", { cx: x, cy: y, r, ...attrs }, parent);
  }

  /** The legend swatch of a series: a line, a dashed line, or its marker's shape. */
  function swatchKind(s) {
    if (s.flag) return s.shape === "diamond" ? "diamond" : "ring";
    if (s.line) return s.dash ? "dash" : "line";
    return s.shape === "square" ? "square" : "dot";
  }

  /**
   * An x-y chart: markers, optional lines and error bars, horizontal reference lines.
   * series: [{name, label, color, points: [{x, y, lo?, hi?, tip?}], line?, dash?, markers?,
   *          shape?, flag?}]
   * Markers are <circle class="pt" data-series=name> (a <rect> or <path> for shape "square" /
   * "diamond"), one per point with a finite y; error bars are <g class="errbar"
   * data-series=name>.  A `flag` series has no y: its points are hollow markers in a lane under
   * the plot, off the value axis (<... class="flag" data-series=name>), for x that have no
   * value to draw.
   * yInclude: values the y axis covers even without a point there.
   * errClip: error bars reach at most this many times the span of the points (reference lines,
   * yInclude) beyond it, so that one huge bar does not flatten the others; a cut end has an
   * arrow.
   */
  function xyChart(body, opts) {
    const has = (s) => (s.flag ? s.points.some((p) => isNum(p.x)) : s.points.some((p) => isNum(p.y)));
    const series = opts.series.filter(has);
    const refs = opts.refLines || [];
    const vrefs = opts.vLines || [];
    const include = opts.yInclude || [];
    if (!series.length) {
      emptyNote(body, opts.empty || "no data yet");
      return;
    }
    body.append(
      legend([
        ...series.map((s) => ({ label: s.label || s.name, color: s.color, kind: swatchKind(s) })),
        ...refs.filter((r) => r.label).map((r) => ({ label: r.label, color: r.color, kind: "dash" })),
        ...vrefs.filter((r) => r.label).map((r) => ({ label: r.label, color: r.color, kind: "vdash" })),
      ]),
    );
    const width = Math.max(300, body.clientWidth || 560);
    const height = opts.height || 250;
    const logY = Boolean(opts.logY);
    const valued = series.filter((s) => !s.flag);
    const flags = series.filter((s) => s.flag);
    const pts = valued.flatMap((s) => s.points.filter((p) => isNum(p.y) && isNum(p.x)));
    const usable = (v) => isNum(v) && (!logY || v > 0);
    // the y range: the points and reference lines, then the error bars (clipped, see errClip)
    const tf = logY ? Math.log10 : (v) => v;
    const core = pts.map((p) => p.y).concat(refs.map((r) => r.y), include).filter(usable);
    let clipLo = -Infinity;
    let clipHi = Infinity;
    if (isNum(opts.errClip) && core.length) {
      const a = Math.min(...core.map(tf));
      const b = Math.max(...core.map(tf));
      const span = b > a ? b - a : Math.abs(a) || 1;
      clipLo = a - opts.errClip * span;
      clipHi = b + opts.errClip * span;
    }
    const bars = pts.flatMap((p) => [p.lo, p.hi]).filter(usable).map((v) => Math.min(clipHi, Math.max(clipLo, tf(v))));
    const yPos = core.map(tf).concat(bars);
    if (!yPos.length) yPos.push(logY ? -1 : 0, logY ? 0 : 1);
    let yMin = Math.min(...yPos);
    let yMax = Math.max(...yPos);
    if (!logY && yMax > yMin) {
      // a little air, so that no point sits on the frame
      const pad = 0.05 * (yMax - yMin);
      yMin -= pad;
      yMax += pad;
    }
    if (logY) {
      yMin = 10 ** yMin;
      yMax = 10 ** yMax;
    }
    const xs = pts.map((p) => p.x).concat(flags.flatMap((s) => s.points.map((p) => p.x).filter(isNum)), vrefs.map((v) => v.x));
    // a flag series gets a lane of its own under the plot, off the value axis
    const lane = flags.length ? 18 : 0;
    const plotH = height - 12 - 42 - lane;
    const yTicks = logY ? logTicks(yMin, yMax, Math.floor(plotH / 28)) : niceTicks(yMin, yMax, Math.max(3, Math.floor(plotH / 40)));
    yMin = yTicks.lo;
    yMax = yTicks.hi;
    const yTickText = yTicks.ticks.map((t) => fmt(t));
    const left = 26 + Math.max(...yTickText.map((t) => textWidth(t))) + 8;
    const right = 16;
    const plotW = width - left - right;
    let xMin = Math.min(...xs);
    let xMax = Math.max(...xs);
    if (xMin === xMax) {
      xMin -= 1;
      xMax += 1;
    }
    const xPad = (xMax - xMin) * 0.04;
    xMin -= xPad;
    xMax += xPad;
    let xTicks = niceTicks(xMin, xMax, Math.max(2, Math.floor(plotW / 70)));
    if (opts.xInteger) {
      const step = Math.max(1, Math.round(xTicks.step));
      const ticks = [];
      for (let t = Math.ceil(xMin / step) * step; t <= xMax; t += step) ticks.push(t);
      xTicks = { ticks, step };
    } else {
      xTicks.ticks = xTicks.ticks.filter((t) => t >= xMin && t <= xMax);
    }
    const top = 12;
    const sx = (x) => left + ((x - xMin) / (xMax - xMin)) * plotW;
    const sy = logY
      ? (y) => top + (1 - (Math.log10(y) - Math.log10(yMin)) / (Math.log10(yMax) - Math.log10(yMin))) * plotH
      : (y) => top + (1 - (y - yMin) / (yMax - yMin)) * plotH;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.ariaLabel || "" });
    const grid = svg("g", { class: "grid" }, root);
    for (const [i, t] of yTicks.ticks.entries()) {
      const y = sy(t);
      svg("line", { x1: left, x2: left + plotW, y1: y, y2: y }, grid);
      svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "tick", text: yTickText[i] }, root);
    }
    for (const t of xTicks.ticks) {
      const x = sx(t);
      svg("line", { x1: x, x2: x, y1: top, y2: top + plotH }, grid);
      svg("text", { x, y: top + plotH + lane + 15, "text-anchor": "middle", class: "tick", text: fmt(t) }, root);
    }
    svg("rect", { x: left, y: top, width: plotW, height: plotH, class: "frame" }, root);
    if (lane) svg("rect", { x: left, y: top + plotH, width: plotW, height: lane, class: "flag-lane" }, root);
    svg("text", { x: left + plotW / 2, y: height - 6, "text-anchor": "middle", class: "axis-label", text: opts.xLabel }, root);
    svg("text", { x: 12, y: top + plotH / 2, "text-anchor": "middle", class: "axis-label", transform: `rotate(-90 12 ${top + plotH / 2})`, text: opts.yLabel }, root);
    const clipId = `clip${++chartIds.n}`;
    svg("rect", { x: left, y: top, width: plotW, height: plotH }, svg("clipPath", { id: clipId }, root));
    const plot = svg("g", { "clip-path": `url(#${clipId})` }, root);
    for (const r of refs) {
      svg("line", { x1: left, x2: left + plotW, y1: sy(r.y), y2: sy(r.y), stroke: r.color, class: "ref" }, plot);
    }
    for (const v of vrefs) {
      tip(svg("line", { x1: sx(v.x), x2: sx(v.x), y1: top, y2: top + plotH, stroke: v.color, class: "ref" }, plot), v.label || "");
    }
    // an error bar's end beyond the plot (errClip, or <= 0 on a log axis) stops at the frame
    // with an arrowhead instead of a cap
    const barEnd = (v, up) => {
      const cut = !isNum(v) || (logY && v <= 0) || (up ? v > yMax : v < yMin);
      return { y: cut ? (up ? top : top + plotH) : sy(v), cut };
    };
    for (const s of valued) {
      const good = s.points.filter((p) => isNum(p.y) && isNum(p.x) && (!logY || p.y > 0));
      if (s.line && good.length > 1) {
        const d = good.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
        svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.6, "stroke-dasharray": s.dash ? "5 4" : null, class: "series-line" }, plot);
      }
      for (const p of good) {
        if (isNum(p.lo) && isNum(p.hi)) {
          const x = sx(p.x);
          const g = svg("g", { class: "errbar", stroke: s.color, "data-series": s.name }, plot);
          const hi = barEnd(p.hi, true);
          const lo = barEnd(p.lo, false);
          svg("line", { x1: x, x2: x, y1: hi.y, y2: lo.y }, g);
          for (const [end, dir] of [[hi, 1], [lo, -1]]) {
            if (end.cut) svg("path", { d: `M${x - 4},${end.y + 6 * dir}L${x},${end.y}L${x + 4},${end.y + 6 * dir}`, fill: "none", class: "cut" }, g);
            else svg("line", { x1: x - 4, x2: x + 4, y1: end.y, y2: end.y }, g);
          }
        }
      }
      if (s.markers !== false) {
        for (const p of good) {
          const c = marker(plot, s.shape, sx(p.x), sy(p.y), s.radius || 3.5, { fill: s.color, class: "pt", "data-series": s.name });
          tip(c, p.tip || `${s.label || s.name}: x=${fmt(p.x)}, y=${fmt(p.y)}`);
        }
      }
    }
    // points without a value: hollow markers in the lane under the plot
    for (const s of flags) {
      for (const p of s.points.filter((q) => isNum(q.x))) {
        const c = marker(root, s.shape, sx(p.x), top + plotH + lane / 2, 4, { fill: "#fff", stroke: s.color, "stroke-width": 1.8, class: "flag", "data-series": s.name });
        tip(c, p.tip || `${s.label || s.name}: x=${fmt(p.x)}`);
      }
    }
    body.append(root);
  }

  /** Diverging colour for t in [-1, 1]: blue (negative) - white - vermillion (positive). */
  function diverging(t) {
    const c = Math.max(-1, Math.min(1, t));
    const [r0, g0, b0] = c >= 0 ? [213, 94, 0] : [0, 114, 178];
    const a = Math.abs(c);
    const mix = (x) => Math.round(255 + (x - 255) * a);
    return `rgb(${mix(r0)},${mix(g0)},${mix(b0)})`;
  }

  /**
   * A square heatmap of a B x B matrix (nulls drawn grey), with a colour-scale legend.
   * Cells are <rect class="cell"> (one per matrix entry, "cell na" for nulls).
   */
  function heatmap(body, opts) {
    const m = opts.matrix || [];
    const n = m.length;
    if (!n) {
      emptyNote(body, "no prompts");
      return;
    }
    const labels = (opts.labels || []).map((l) => String(l));
    const vals = m.flat().filter(isNum);
    const maxAbs = opts.fixedMax || Math.max(1e-300, ...vals.map(Math.abs));
    const width = Math.max(300, body.clientWidth || 560);
    const shown = labels.map((l) => (l.length > 10 ? `${l.slice(0, 9)}…` : l));
    const labelW = Math.min(80, Math.max(...shown.map((l) => textWidth(l, 10)))) + 8;
    const legendW = 74;
    const avail = Math.min(width - labelW - legendW - 10, 420);
    const cell = Math.max(2, Math.min(64, Math.floor(avail / n)));
    const side = cell * n;
    const top = 8;
    const height = top + side + labelW + 26;
    const every = Math.max(1, Math.ceil(12 / cell));
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const g = svg("g", {}, root);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        const v = m[i][j];
        const ok = isNum(v);
        const r = svg(
          "rect",
          {
            x: labelW + j * cell,
            y: top + i * cell,
            width: cell,
            height: cell,
            fill: ok ? diverging(v / maxAbs) : "url(#na-pattern)",
            class: ok ? "cell" : "cell na",
            "data-i": i,
            "data-j": j,
          },
          g,
        );
        tip(r, `prompts ${labels[i]} × ${labels[j]}: ${ok ? fmt(v) : "n/a (one sequence: no pairs)"}`);
      }
    }
    svg("rect", { x: labelW, y: top, width: side, height: side, class: "frame" }, root);
    for (let i = 0; i < n; i += every) {
      const c = labelW + i * cell + cell / 2;
      svg("text", { x: labelW - 4, y: top + i * cell + cell / 2 + 3.5, "text-anchor": "end", class: "tick small", text: shown[i] }, root);
      svg("text", { x: c + 3.5, y: top + side + 4, "text-anchor": "end", transform: `rotate(-90 ${c + 3.5} ${top + side + 4})`, class: "tick small", text: shown[i] }, root);
    }
    svg("text", { x: labelW + side / 2, y: height - 4, "text-anchor": "middle", class: "axis-label", text: "prompt" }, root);
    // colour legend: a vertical gradient bar with its scale and unit
    const gid = `grad${++chartIds.n}`;
    const grad = svg("linearGradient", { id: gid, x1: 0, y1: 1, x2: 0, y2: 0 }, svg("defs", {}, root));
    for (const t of [-1, -0.5, 0, 0.5, 1]) svg("stop", { offset: `${(t + 1) * 50}%`, "stop-color": diverging(t) }, grad);
    const pat = svg("pattern", { id: "na-pattern", width: 6, height: 6, patternUnits: "userSpaceOnUse" }, root.querySelector("defs"));
    svg("rect", { width: 6, height: 6, fill: "#e4e4e4" }, pat);
    svg("path", { d: "M0,6 L6,0", stroke: "#b0b0b0", "stroke-width": 1 }, pat);
    const lx = labelW + side + 16;
    const lh = Math.max(90, Math.min(side, 200));
    const leg = svg("g", { class: "color-legend" }, root);
    svg("rect", { x: lx, y: top, width: 12, height: lh, fill: `url(#${gid})`, class: "frame" }, leg);
    for (const [t, label] of [[1, fmt(maxAbs)], [0, "0"], [-1, fmt(-maxAbs)]]) {
      const y = top + (1 - (t + 1) / 2) * lh;
      svg("line", { x1: lx + 12, x2: lx + 16, y1: y, y2: y, stroke: "#333" }, leg);
      svg("text", { x: lx + 18, y: y + 4, class: "tick small", text: label }, leg);
    }
    svg("rect", { x: lx, y: top + lh + 8, width: 12, height: 10, fill: "url(#na-pattern)", class: "frame" }, leg);
    svg("text", { x: lx + 18, y: top + lh + 17, class: "tick small", text: "n/a" }, leg);
    svg("text", { x: lx, y: top + lh + 34, class: "tick small", text: opts.unit || "" }, leg);
    body.append(root);
  }

  /** Histogram of positive or real values; bars are <rect class="bar">. */
  function histogram(body, opts) {
    const values = (opts.values || []).filter(isNum);
    if (!values.length) {
      emptyNote(body, "no values");
      return;
    }
    const lo0 = Math.min(...values);
    const hi0 = Math.max(...values);
    const logX = lo0 > 0 && hi0 / lo0 > 100;
    const tx = logX ? Math.log10 : (v) => v;
    const lo = tx(lo0);
    const hi = tx(hi0) === lo ? lo + 1 : tx(hi0);
    const nb = Math.max(5, Math.min(30, Math.ceil(Math.sqrt(values.length) * 2)));
    const counts = new Array(nb).fill(0);
    for (const v of values) counts[Math.min(nb - 1, Math.floor(((tx(v) - lo) / (hi - lo)) * nb))] += 1;
    const width = Math.max(300, body.clientWidth || 560);
    const height = 230;
    const top = 12;
    const plotH = height - top - 42;
    const yT = niceTicks(0, Math.max(...counts), Math.max(3, Math.floor(plotH / 40)));
    yT.ticks = yT.ticks.filter((t) => Number.isInteger(t));
    const left = 26 + Math.max(...yT.ticks.map((t) => textWidth(fmt(t)))) + 8;
    const plotW = width - left - 16;
    const sx = (v) => left + ((v - lo) / (hi - lo)) * plotW;
    const sy = (c) => top + (1 - c / yT.hi) * plotH;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const grid = svg("g", { class: "grid" }, root);
    for (const t of yT.ticks) {
      svg("line", { x1: left, x2: left + plotW, y1: sy(t), y2: sy(t) }, grid);
      svg("text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick", text: fmt(t) }, root);
    }
    const xt = logX ? logTicks(lo0, hi0, 8).ticks.map(Math.log10) : niceTicks(lo, hi, Math.floor(plotW / 70)).ticks;
    for (const t of xt.filter((t) => t >= lo - 1e-9 && t <= hi + 1e-9)) {
      svg("text", { x: sx(t), y: top + plotH + 15, "text-anchor": "middle", class: "tick", text: fmt(logX ? 10 ** t : t) }, root);
      svg("line", { x1: sx(t), x2: sx(t), y1: top + plotH, y2: top + plotH + 4, stroke: "#555" }, root);
    }
    const bw = plotW / nb;
    for (let b = 0; b < nb; b++) {
      const a = lo + ((hi - lo) * b) / nb;
      const z = lo + ((hi - lo) * (b + 1)) / nb;
      const r = svg("rect", { x: left + b * bw + 0.5, y: sy(counts[b]), width: Math.max(1, bw - 1), height: top + plotH - sy(counts[b]), fill: COLORS.hist, class: "bar", "data-count": counts[b] }, root);
      tip(r, `${fmt(logX ? 10 ** a : a)} … ${fmt(logX ? 10 ** z : z)}: ${counts[b]} sequences`);
    }
    svg("rect", { x: left, y: top, width: plotW, height: plotH, class: "frame" }, root);
    svg("text", { x: left + plotW / 2, y: height - 6, "text-anchor": "middle", class: "axis-label", text: opts.xLabel + (logX ? " (log scale)" : "") }, root);
    svg("text", { x: 12, y: top + plotH / 2, "text-anchor": "middle", class: "axis-label", transform: `rotate(-90 12 ${top + plotH / 2})`, text: opts.yLabel || "sequences" }, root);
    body.append(root);
  }

  /** Horizontal bars around zero, one row per item; bars are <rect class="hbar">. */
  function hbars(body, opts) {
    const items = (opts.items || []).filter((it) => isNum(it.value));
    if (!items.length) {
      emptyNote(body, opts.empty || "no data");
      return;
    }
    const width = Math.max(300, body.clientWidth || 560);
    const row = 26;
    const top = 6;
    const labelW = Math.min(200, Math.max(...items.map((it) => textWidth(it.label))) + 10);
    const noteW = Math.min(180, Math.max(0, ...items.map((it) => textWidth(it.note || ""))) + 10);
    const plotW = width - labelW - noteW - 12;
    const height = top + row * items.length + 40;
    const vals = items.flatMap((it) => [it.value, 0, it.lo, it.hi].filter(isNum));
    const t = niceTicks(Math.min(...vals), Math.max(...vals), Math.max(2, Math.floor(plotW / 80)));
    const sx = (v) => labelW + ((v - t.lo) / (t.hi - t.lo)) * plotW;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const grid = svg("g", { class: "grid" }, root);
    const plotBottom = top + row * items.length;
    for (const v of t.ticks) {
      svg("line", { x1: sx(v), x2: sx(v), y1: top, y2: plotBottom }, grid);
      svg("text", { x: sx(v), y: plotBottom + 14, "text-anchor": "middle", class: "tick", text: fmt(v) }, root);
    }
    for (const [i, it] of items.entries()) {
      const y = top + i * row + 4;
      const x0 = sx(0);
      const x1 = sx(it.value);
      const r = svg("rect", { x: Math.min(x0, x1), y, width: Math.max(1, Math.abs(x1 - x0)), height: row - 8, fill: it.value < 0 ? COLORS.neg : COLORS.pos, class: "hbar", "data-label": it.label }, root);
      tip(r, `${it.label}: ${fmt(it.value)}${it.note ? ` (${it.note})` : ""}`);
      svg("text", { x: labelW - 6, y: y + row / 2, "text-anchor": "end", class: "tick", text: it.label }, root);
      if (it.note) svg("text", { x: labelW + plotW + 8, y: y + row / 2, class: "tick small", text: it.note }, root);
    }
    svg("line", { x1: sx(0), x2: sx(0), y1: top, y2: plotBottom, stroke: "#333" }, root);
    svg("text", { x: labelW + plotW / 2, y: height - 6, "text-anchor": "middle", class: "axis-label", text: opts.xLabel }, root);
    body.append(root);
  }

  // ---------------------------------------------------------------- sortable table
  /**
   * A table whose headers sort it (click: descending, again: ascending).
   * columns: [{key, label, num?, fmt?, title?}]; rows: objects; state: {key, dir}, owned by
   * the page and updated in place, so a redraw (new data, resize) keeps the user's order.
   */
  function sortableTable(rows, columns, state) {
    const table = el("table", { class: "data sortable" });
    const thead = el("thead");
    const tbody = el("tbody");
    table.append(thead, tbody);
    const headRow = el("tr");
    thead.append(headRow);
    const draw = () => {
      const col = columns.find((c) => c.key === state.key);
      const sorted = rows.slice().sort((a, b) => {
        const x = a[state.key];
        const y = b[state.key];
        let c;
        if (col && col.num) c = (isNum(x) ? x : -Infinity) - (isNum(y) ? y : -Infinity);
        else c = String(x ?? "").localeCompare(String(y ?? ""), undefined, { numeric: true });
        return state.dir === "asc" ? c : -c;
      });
      headRow.replaceChildren(
        ...columns.map((c) =>
          el(
            "th",
            {
              "data-key": c.key,
              class: c.num ? "num" : null,
              title: c.title || `sort by ${c.label}`,
              "aria-sort": c.key === state.key ? (state.dir === "asc" ? "ascending" : "descending") : "none",
              onclick: () => {
                state.dir = state.key === c.key && state.dir === "desc" ? "asc" : "desc";
                state.key = c.key;
                draw();
              },
            },
            c.label,
            c.key === state.key ? (state.dir === "asc" ? " ▲" : " ▼") : "",
          ),
        ),
      );
      tbody.replaceChildren(
        ...sorted.map((r) =>
          el(
            "tr",
            {},
            columns.map((c) => el("td", { class: c.num ? "num" : null, "data-key": c.key, "data-value": isNum(r[c.key]) ? r[c.key] : null }, c.fmt ? c.fmt(r[c.key], r) : r[c.key] ?? "–")),
          ),
        ),
      );
    };
    draw();
    return table;
  }

  // ---------------------------------------------------------------- pages
  const view = document.getElementById("view");
  const crumbs = document.getElementById("crumbs");
  const live = document.getElementById("live");
  let page = null;
  let timer = null;

  function setCrumbs(parts) {
    crumbs.replaceChildren(
      ...parts.flatMap((p, i) => [i ? el("span", { class: "sep", text: "/" }) : null, p.href ? el("a", { href: p.href, text: p.label }) : el("span", { text: p.label })]).filter(Boolean),
    );
  }

  function showError(box, err) {
    if (err instanceof ApiError && err.status === 401) {
      box.replaceChildren(el("p", { class: "error", text: "This service needs an API token: enter it above (it is kept in this tab only, never in the address)." }));
      document.getElementById("token-input").focus();
      return;
    }
    box.replaceChildren(el("p", { class: "error", text: `Could not load: ${err.message}` }));
  }

  function specText(run) {
    const s = run.sketch || {};
    const groups = s.groups && s.groups.length ? `, groups: ${s.groups.map((g) => `${g.name} (k=${g.dim})`).join(", ")}` : "";
    const k = isNum(run.k) ? run.k : s.dim;
    return `${s.kind} k=${k} seed=${s.seed}${groups}`;
  }

  const when = (t) => (isNum(t) ? new Date(t * 1000).toLocaleString() : "–");

  /** Runs list. */
  function runsPage() {
    setCrumbs([{ label: "runs" }]);
    const box = el("section", { class: "card" }, el("h2", { text: "Runs" }), el("p", { class: "empty", text: "loading…" }));
    view.replaceChildren(box);
    const runsSort = { key: "created", dir: "desc" };
    let sig = "";
    return {
      async refresh() {
        const listed = await api("/v1/runs");
        const runs = Array.isArray(listed) ? listed : listed.runs || [];
        const details = await Promise.all(runs.map((r) => api(`/v1/runs/${enc(r.run_id)}`).catch(() => r)));
        const next = JSON.stringify(details);
        if (next === sig) return;
        sig = next;
        if (!details.length) {
          box.replaceChildren(el("h2", { text: "Runs" }), el("p", { class: "empty", text: "No runs yet. Start one with `kernelscope demo` or POST /v1/runs." }));
          return;
        }
        const rows = details.map((d) => {
          const steps = d.steps || [];
          const last = steps.length ? steps.reduce((a, b) => (b.step > a.step ? b : a)) : null;
          return { run: d.run_id, spec: specText(d), normalization: d.normalization, geometry: d.geometry, steps: steps.length, last: last ? last.step : null, state: last ? last.state : "–", created: d.created_at };
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

  /** se of dH1 combining sampling and sketch error (independent sources). */
  const seTotal = (r) => Math.sqrt((isNum(r.se_sampling) ? r.se_sampling ** 2 : 0) + (isNum(r.se_sketch) ? r.se_sketch ** 2 : 0));

  /** Fixed-point text as Python's f"{v:.2f}" (the terminal report's ratio cell). */
  const fixed2 = (v) => v.toFixed(2);

  /**
   * The ratio cell of a flat row (ratio, ratio_low, ratio_high, ratio_estimable, regime), by
   * the rules of service/report.py `ratio_text`: the flag instead of the number when the step is
   * outside the Taylor regime or the ratio is not estimable.
   */
  function ratioText(r) {
    if (r.regime === "outside") return "outside Taylor";
    if (!isNum(r.ratio)) return "–";
    if (r.ratio_estimable === false) return "not estimable";
    let text = fixed2(r.ratio);
    if (isNum(r.ratio_low) && isNum(r.ratio_high)) text += ` [${fixed2(r.ratio_low)}, ${fixed2(r.ratio_high)}]`;
    if (r.regime === "second_order") text += " (2nd order)";
    return text;
  }

  /** The ratio when it is worth a number (estimable, inside the Taylor regime), else null. */
  const ratioShown = (r) => (r.regime !== "outside" && r.ratio_estimable !== false && isNum(r.ratio) ? r.ratio : null);

  const REGIMES = {
    first_order: "first order",
    second_order: "second order",
    outside: "outside Taylor",
    unknown: "unknown",
  };
  const REGIME_NOTES = {
    first_order: `KL(π‖π′) ≤ ${KL_FIRST_ORDER} nats: dH1 alone should match the realized change`,
    second_order: "compare dH1 + dH2 with the realized change",
    outside: "the step is too large for a Taylor prediction",
    unknown: "no logprob_after: the step's size is not known",
  };
  const regimeLabel = (v) => (v ? REGIMES[v] || String(v) : "–");

  /** "x ± se" as a node: the value, then the s.e. in muted text (only when known). */
  function pmText(v, se) {
    if (!isNum(v)) return "–";
    return isNum(se) ? el("span", {}, fmt(v), el("span", { class: "pm", text: ` ± ${fmt(se)}` })) : fmt(v);
  }

  function noiseValue(v) {
    if (isNum(v)) return v;
    return v && isNum(v.b_simple) ? v.b_simple : null;
  }

  /** A run: entropy over steps, ratio, step size, noise scale, steps table. */
  function runPage(runId) {
    setCrumbs([{ label: "runs", href: "#/" }, { label: runId }]);
    const head = el("section", { class: "card run-head" }, el("h2", { text: `Run ${runId}` }), el("p", { class: "empty", text: "loading…" }));
    const cEntropy = el("section", { class: "wide" });
    const cRatio = el("section");
    const cKl = el("section");
    const cStepNorm = el("section");
    const cNoise = el("section");
    const cBaseline = el("section", { class: "wide" });
    const steps = el("section", { class: "card wide" });
    view.replaceChildren(head, el("div", { class: "grid" }, cEntropy, cRatio, cKl, cStepNorm, cNoise, cBaseline, steps));
    const stepsSort = { key: "step", dir: "desc" };
    const stepCache = new Map(); // step -> {key, row}: the last full analysis of each step
    const stepKey = (s) => `${s.rows}|${s.sequences}|${s.uploads}|${s.pending_uploads}|${s.learning_rate}|${s.applied_update}`;
    let sig = "";
    let lastData = null;

    /** ± 2 s.e. around v, or no bar when the s.e. is unknown. */
    const bar2 = (v, se) => (isNum(v) && isNum(se) ? { lo: v - 2 * se, hi: v + 2 * se } : {});

    function drawEntropy(rows) {
      const body = chartCard(cEntropy, "entropy", "Entropy change per step: predicted against realized", "predicted dH1 with ±2 s.e. bars (sampling and sketch error combined); the realized change with ±2 s.e. bars when it is estimated from logprob_after (a posted change has none); dH1 along the update the optimizer really applied; the second-order prediction dH1 + dH2");
      xyChart(body, {
        xLabel: "step",
        yLabel: "entropy change ΔH (nats)",
        xInteger: true,
        height: 280,
        errClip: 1,
        refLines: [{ y: 0, color: "#999" }],
        series: [
          { name: "predicted", label: "predicted dH1 ± 2 s.e.", color: COLORS.predicted, line: true, points: rows.map((r) => ({ x: r.step, y: r.delta_h1, lo: r.delta_h1 - 2 * seTotal(r), hi: r.delta_h1 + 2 * seTotal(r), tip: `step ${r.step}: dH1 = ${fmt(r.delta_h1)} ± ${fmt(seTotal(r))} nats (${r.estimator})` })) },
          {
            name: "realized",
            label: "realized ΔH ± 2 s.e.",
            color: COLORS.realized,
            line: true,
            points: rows.map((r) => ({
              x: r.step,
              y: r.realized,
              ...bar2(r.realized, r.realized_se),
              tip: `step ${r.step}: realized ΔH = ${fmt(r.realized)}${isNum(r.realized_se) ? ` ± ${fmt(r.realized_se)}` : ""} nats (${r.realized_source || "?"})`,
            })),
          },
          { name: "applied", label: "dH1 of the applied update", color: COLORS.applied, line: true, dash: true, points: rows.map((r) => ({ x: r.step, y: r.delta_h1_applied })) },
          { name: "second-order", label: "dH1 + dH2 (second order)", color: COLORS.second, line: true, dash: true, radius: 2.5, points: rows.map((r) => ({ x: r.step, y: r.delta_h1_plus_h2, tip: `step ${r.step}: dH1 + dH2 = ${fmt(r.delta_h1_plus_h2)} nats` })) },
        ],
        empty: "no analysed step yet",
      });
    }

    function drawRatio(rows) {
      const shown = rows.filter((r) => isNum(ratioShown(r)));
      const tipOf = (r) => `step ${r.step}: realized / dH1 = ${ratioText(r)}`;
      const ratioPoint = (r) => ({ x: r.step, y: r.ratio, lo: r.ratio_low, hi: r.ratio_high, tip: tipOf(r) });
      const body = chartCard(cRatio, "ratio", "Realized / predicted", "realized ΔH / dH1 with its Fieller interval at ±2 s.e.; 1 = first order explains all of it; squares: second-order regime (compare dH1 + dH2); in the strip under the plot: the ratio is not estimable (|dH1| ≤ 2 s.e.: noise) or the step is outside the Taylor regime");
      xyChart(body, {
        xLabel: "step",
        yLabel: "realized ΔH / dH1 (ratio)",
        xInteger: true,
        errClip: 1.5,
        yInclude: [0, 2],
        refLines: [{ y: 1, color: "#999", label: "ratio 1" }],
        series: [
          { name: "ratio", label: "ratio ± 2 s.e.", color: COLORS.ratio, points: shown.filter((r) => r.regime !== "second_order").map(ratioPoint) },
          { name: "ratio-second-order", label: "ratio, 2nd-order regime", color: COLORS.ratio, shape: "square", points: shown.filter((r) => r.regime === "second_order").map(ratioPoint) },
          { name: "not-estimable", label: "not estimable", color: COLORS.notEstimable, flag: true, points: rows.filter((r) => r.regime !== "outside" && isNum(r.ratio) && r.ratio_estimable === false).map((r) => ({ x: r.step, tip: `step ${r.step}: ratio not estimable, |dH1| = ${fmt(Math.abs(r.delta_h1))} ≤ 2 s.e. = ${fmt(2 * seTotal(r))} (realized / dH1 would read ${fmt(r.ratio)})` })) },
          { name: "outside", label: "outside Taylor regime", color: COLORS.outside, flag: true, shape: "diamond", points: rows.filter((r) => r.regime === "outside").map((r) => ({ x: r.step, tip: `step ${r.step}: outside the Taylor regime${r.regime_reasons && r.regime_reasons.length ? ` (${r.regime_reasons.join("; ")})` : ""}` })) },
        ],
        empty: "no step with a realized change yet (POST …/realized or logprob_after)",
      });
    }

    function drawKl(rows) {
      const kls = rows.map((r) => r.kl).filter((v) => isNum(v) && v > 0);
      const logY = kls.length === rows.filter((r) => isNum(r.kl)).length && kls.length > 0 && Math.max(KL_SECOND_ORDER, ...kls) / Math.min(KL_FIRST_ORDER, ...kls) > 30;
      const body = chartCard(cKl, "kl", "Step size KL(π‖π′)", `KL of the policy after the step from the policy before, per prompt and averaged (nats, from logprob_after), ±2 s.e.; up to ${KL_FIRST_ORDER} nats dH1 alone should match the realized change, up to ${KL_SECOND_ORDER} compare dH1 + dH2, beyond it no Taylor prediction holds`);
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
        el(
          "dl",
          { class: "facts" },
          el("dt", { text: "sketch" }), el("dd", { text: specText(run) }),
          el("dt", { text: "normalization" }), el("dd", { text: run.normalization }),
          el("dt", { text: "geometry" }), el("dd", { text: run.geometry }),
          el("dt", { text: "steps" }), el("dd", { text: (run.steps || []).length }),
          el("dt", { text: "created" }), el("dd", { text: when(run.created_at) }),
        ),
      );
      const pts = (key, f = (r) => r[key]) => rows.map((r) => ({ x: r.step, y: f(r) }));
      drawEntropy(rows);
      xyChart(chartCard(cBaseline, "baseline", "Covariance baseline (Cui et al. 2025)", "−(1/B) Σ_p Cov(S, A): the entropy dynamics with an identity kernel, no learning rate; compare its sign and trend with dH1"), {
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
      const noise = pts("noise_scale", (r) => noiseValue(r.noise_scale));
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
      const statusByStep = new Map((run.steps || []).map((s) => [s.step, s]));
      const byStep = new Map(rows.map((r) => [r.step, r]));
      const tableRows = [...statusByStep.values()].map((s) => {
        const r = byStep.get(s.step) || {};
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
        el("p", { class: "sub", text: "entropy changes and KL(π‖π′) in nats; realized and KL ± 1 s.e.; ratio: realized / dH1 with its Fieller interval at 2 s.e.; “not estimable”: |dH1| ≤ 2 s.e.; “outside Taylor”: KL(π‖π′) > 0.3, too large a step for a Taylor prediction; “(2nd order)”: compare dH1 + dH2 (docs/math.md §6). Click a header to sort." }),
        el(
          "div",
          { class: "table-scroll" },
          sortableTable(
            tableRows,
            [
              { key: "step", label: "step", num: true, fmt: (v) => el("a", { href: `#/runs/${enc(runId)}/steps/${v}`, text: v }) },
              { key: "state", label: "state", fmt: (v) => el("span", { class: `state ${v}`, text: v }) },
              { key: "sequences", label: "sequences", num: true },
              { key: "rows", label: "rows", num: true },
              { key: "pending", label: "queued", num: true, title: "queued uploads; sort by them" },
              { key: "dh1", label: "dH1", num: true, fmt: (v) => fmt(v) },
              { key: "se", label: "s.e.", num: true, fmt: (v) => fmt(v) },
              { key: "realized", label: "realized ± s.e.", num: true, fmt: (v, r) => el("span", { title: r.realized_source ? `source: ${r.realized_source}` : null }, pmText(v, r.realized_se)) },
              { key: "ratio", label: "realized / dH1 [2 s.e.]", num: true, fmt: (v, r) => el("span", { class: isNum(v) ? null : "flagged" }, r.ratio_text) },
              { key: "kl", label: "KL(π‖π′) ± s.e.", num: true, fmt: (v, r) => pmText(v, r.kl_se) },
              { key: "regime", label: "regime", fmt: (v, r) => el("span", { class: `regime ${v || "none"}`, title: (r.regime_reasons && r.regime_reasons.length ? r.regime_reasons.join("; ") : REGIME_NOTES[v]) || null, text: regimeLabel(v) }) },
              { key: "baseline", label: "cov. baseline", num: true, fmt: (v) => fmt(v) },
            ],
            stepsSort,
          ),
        ),
      );
    }

    /** The fields of a step's full entropy answer that the run page draws, flat as the history's. */
    function fromEntropy(step, e) {
      const real = e.realized || {};
      const interval = e.ratio_interval || {};
      const taylor = e.taylor || {};
      return {
        step,
        delta_h1: e.delta_h1,
        estimator: e.estimator,
        se_sampling: e.se_sampling,
        se_sketch: e.se_sketch,
        realized: e.realized ? real.delta_h : null,
        realized_se: real.se ?? null,
        realized_source: real.source ?? null,
        realized_snis: real.delta_h_snis ?? null,
        ratio: e.ratio ?? null,
        ratio_low: interval.low ?? null,
        ratio_high: interval.high ?? null,
        ratio_estimable: interval.estimable ?? null,
        kl: taylor.kl ?? null,
        kl_se: taylor.kl_se ?? null,
        regime: taylor.regime ?? null,
        regime_reasons: taylor.reasons || [],
        delta_h1_applied: e.delta_h1_applied,
        delta_h2: e.delta_h2,
        delta_h1_plus_h2: e.delta_h1_plus_h2,
        cov_baseline: e.cov_baseline,
        noise_scale: noiseValue(e.noise_scale),
        step_norm: e.step_norm,
      };
    }

    return {
      async refresh() {
        const [run, hist] = await Promise.all([api(`/v1/runs/${enc(runId)}`), api(`/v1/runs/${enc(runId)}/entropy`)]);
        const summaries = new Map((Array.isArray(hist) ? hist : hist.steps || []).map((r) => [r.step, r]));
        // GET .../entropy lists only steps analysed before, without the covariance baseline and
        // the noise scale: analyse each ready step here (the server caches by data version), again
        // when its status changes, and always the newest few (a realized change may arrive late)
        const ready = (run.steps || []).filter((s) => s.state === "ready").sort((a, b) => a.step - b.step);
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
                const e = await api(`/v1/runs/${enc(runId)}/steps/${s.step}/entropy?wait=5`);
                stepCache.set(s.step, { key: stepKey(s), row: fromEntropy(s.step, e) });
              } catch (_e) {
                // a step that cannot be analysed (e.g. no update rows) keeps its summary, if any
                stepCache.set(s.step, { key: stepKey(s), row: null });
              }
            }),
          );
        }
        const steps = new Set([...summaries.keys(), ...stepCache.keys()]);
        const rows = [...steps]
          .sort((a, b) => a - b)
          .map((step) => {
            const hit = stepCache.get(step);
            const base = summaries.get(step) || {};
            // the step's own answer wins over the history row (both carry the server's ratio)
            return hit && hit.row ? { ...base, ...hit.row } : { ...base };
          })
          .filter((r) => isNum(r.delta_h1));
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

  /** Rows of the "sequences that drive entropy" table from the step's entropy answer. */
  function sequenceRows(entropy, meta) {
    const per = entropy.per_sequence;
    let list = [];
    if (Array.isArray(per)) list = per;
    else if (per && typeof per === "object") {
      for (const [role, items] of Object.entries(per)) {
        if (Array.isArray(items)) list = list.concat(items.map((it) => ({ role, ...it })));
      }
    }
    return list.map((it) => {
      const m = meta.get(it.id) || {};
      const pick = (...keys) => keys.map((k) => it[k]).find((v) => v !== undefined && v !== null);
      return {
        id: it.id,
        role: it.role || m.role || "update",
        prompt: pick("prompt_id") ?? m.prompt_id,
        advantage: pick("advantage") ?? m.advantage,
        logprob: pick("logprob") ?? m.logprob,
        tokens: pick("num_tokens") ?? m.num_tokens,
        contribution: pick("contribution", "a", "b", "value"),
      };
    });
  }

  /** The numbers at the top of the step page, from the step's entropy answer. */
  function stepKpis(e) {
    const real = e.realized || {};
    const interval = e.ratio_interval || {};
    const taylor = e.taylor || {};
    const flat = { ratio: e.ratio, ratio_low: interval.low, ratio_high: interval.high, ratio_estimable: interval.estimable, regime: taylor.regime };
    let realNote = "none yet: POST …/realized, or send logprob_after with the sequences";
    if (real.source === "logprob_after") {
      realNote = `${(real.estimator || "?").replace(/_/g, " ")} estimate from logprob_after over ${real.num_sequences} sequences, ${real.num_prompts} prompts; self-normalised (SNIS) ${fmt(real.delta_h_snis)}, for comparison`;
    } else if (real.source === "posted") {
      realNote = "posted entropy_after − entropy_before, taken as exact (no s.e.)";
    } else if (real.source === "given") {
      realNote = "given by the caller, taken as exact (no s.e.)";
    }
    let ratioNote = "";
    if (taylor.regime === "outside") ratioNote = "the step is outside the Taylor regime: no ratio (see the regime)";
    else if (isNum(e.ratio) && interval.estimable === false) ratioNote = `|dH1| ≤ ${fmt(interval.z)} s.e.: realized / dH1 = ${fmt(e.ratio)} would be noise`;
    else if (isNum(interval.low)) ratioNote = `Fieller interval at ±${fmt(interval.z)} s.e.; error correlation ${fmt(interval.correlation, 2)}`;
    const reasons = taylor.reasons || [];
    return [
      { key: "dh1", label: "dH1 ± 1 s.e. (predicted, nats)", value: e.delta_h1, se: seTotal(e), text: pmText(e.delta_h1, seTotal(e)), note: `estimator ${e.estimator}; s.e. sampling ${fmt(e.se_sampling)}, sketch ${fmt(e.se_sketch)}`, title: "first-order entropy change η <grad_hat H, g_hat>" },
      { key: "realized", label: "realized ΔH ± 1 s.e. (nats)", value: real.delta_h, se: real.se, text: pmText(real.delta_h, real.se), note: realNote, title: "the entropy change that happened (docs/math.md §6)" },
      { key: "ratio", label: "realized / dH1 [2 s.e.]", value: e.ratio, text: ratioText(flat), note: ratioNote, title: "1 = first order explains the whole change" },
      { key: "kl", label: "step size KL(π‖π′) ± 1 s.e. (nats)", value: taylor.kl, se: taylor.kl_se, text: pmText(taylor.kl, taylor.kl_se), note: `limits ${KL_FIRST_ORDER} nats (first order), ${KL_SECOND_ORDER} nats (second order)`, title: "KL of the policy after the step from the policy before, per prompt, averaged; from logprob_after" },
      { key: "regime", label: "Taylor regime", text: regimeLabel(taylor.regime), note: reasons.length ? reasons.join("; ") : REGIME_NOTES[taylor.regime] || "", title: "which prediction the step's size allows (docs/math.md §6)" },
      { key: "dh1-dh2", label: "dH1 + dH2 (second order, nats)", value: e.delta_h1_plus_h2, text: fmt(e.delta_h1_plus_h2), note: "compare with the realized change in the second-order regime", title: "first-order change along the applied update plus the curvature term" },
      { key: "applied", label: "dH1 applied update", value: e.delta_h1_applied, text: fmt(e.delta_h1_applied), title: "<grad H, u> with the real update" },
      { key: "dh2", label: "dH2 (second order)", value: e.delta_h2, text: fmt(e.delta_h2), title: "curvature term from logprob_after" },
      { key: "diag", label: "dH1 if K were diagonal", value: e.delta_h1_diag, text: fmt(e.delta_h1_diag), title: "diagonal-kernel approximation" },
      { key: "baseline", label: "covariance baseline", value: e.cov_baseline, text: fmt(e.cov_baseline), title: "−(1/B) Σ_p Cov(S, A), Cui et al. 2025" },
      { key: "noise", label: "noise scale B_simple", value: noiseValue(e.noise_scale), text: fmt(noiseValue(e.noise_scale)), title: "prompts" },
    ];
  }

  /** A step: spectrum, heatmaps, diagonal, decomposition, sequence table. */
  function stepPage(runId, step) {
    setCrumbs([{ label: "runs", href: "#/" }, { label: runId, href: `#/runs/${enc(runId)}` }, { label: `step ${step}` }]);
    const head = el("section", { class: "card run-head" }, el("h2", { text: `Step ${step}` }), el("p", { class: "empty", text: "loading…" }));
    const summary = el("section", { class: "card wide summary" });
    const cSpec = el("section");
    const cDiag = el("section");
    const cHeatK = el("section");
    const cHeatR = el("section");
    const cPairs = el("section");
    const cQuad = el("section");
    const cGroups = el("section");
    const table = el("section", { class: "card wide" });
    view.replaceChildren(head, el("div", { class: "grid" }, summary, cSpec, cDiag, cHeatK, cHeatR, cPairs, cQuad, cGroups, table));
    const base = `/v1/runs/${enc(runId)}/steps/${step}`;
    const seqSort = { key: "contribution", dir: "asc" };
    let statusSig = "";
    let data = null;

    function drawHead(status) {
      const errors = (status.errors || []).map((e) => el("li", { text: `${e.upload_id}: ${e.error} (${e.attempts} attempts)` }));
      head.replaceChildren(
        ...[
        el("h2", {}, `Step ${step} `, el("span", { class: `state ${status.state}`, text: status.state })),
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
      const { spectrum, blocks, diagonal, entropy } = data;
      const e = entropy;
      summary.replaceChildren(
        el("h3", { text: "Entropy change of this step" }),
        el("p", { class: "sub", text: "± 1 standard error (the run page's bars are ±2 s.e.); the ratio's interval is Fieller's at ±2 s.e. (docs/math.md §6). Hover a number for its definition." }),
        el(
          "div",
          { class: "kpis" },
          stepKpis(e).map((k) =>
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

      const eig = (spectrum.eigenvalues || []).filter(isNum);
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
      const pm = blocks.prompt_matrix || {};
      heatmap(chartCard(cHeatK, "heat-k", "Mean kernel by prompt pair", "mean K(i,j) over pairs of the two prompts (i ≠ j within a prompt)"), { matrix: pm.mean_k, labels: pm.prompts, unit: "mean K" });
      heatmap(chartCard(cHeatR, "heat-rho", "Mean cosine by prompt pair", "mean ρ(i,j) = K(i,j)/√(K(i,i)K(j,j))"), { matrix: pm.mean_rho, labels: pm.prompts, unit: "mean cosine ρ", fixedMax: 1 });

      const dec = e.decomposition || {};
      const pairs = dec.pair_types || dec.pairs || dec.by_pair_type || {};
      const pairItems = ["diagonal", "same_prompt", "cross_prompt"]
        .filter((k) => pairs[k] !== undefined && pairs[k] !== null)
        .map((k) => {
          const v = pairs[k];
          const value = isNum(v) ? v : v.value ?? v.delta_h1;
          const share = isNum(v) ? null : v.share;
          return { label: k.replace("_", " "), value, note: isNum(share) ? `share ${fmtPct(share)}` : "" };
        });
      hbars(chartCard(cPairs, "pairs", "dH1 by pair type", "contribution of sequence pairs (j, i) to h^T K c"), { items: pairItems, xLabel: "contribution to dH1 (nats)" });
      const quads = dec.quadrants || dec.by_quadrant || {};
      const quadList = Array.isArray(quads)
        ? quads
        : Object.entries(quads).map(([k, v]) => ({ name: k, ...(isNum(v) ? { value: v } : v) }));
      const quadItems = quadList.map((q) => ({
        label: q.label || quadrantLabel(q),
        value: [q.sum, q.value, q.delta_h1].find(isNum),
        note: isNum(q.count) ? `${q.count} seq.` : "",
      }));
      hbars(chartCard(cQuad, "quadrants", "dH1 by kind of sequence", "advantage sign × log-prob above/below its prompt's mean"), { items: quadItems, xLabel: "contribution to dH1 (nats)" });
      const groups = dec.groups || dec.by_group || null;
      const groupList = groups ? (Array.isArray(groups) ? groups : Object.entries(groups).map(([k, v]) => ({ name: k, ...(isNum(v) ? { value: v } : v) }))) : [];
      if (groupList.length) {
        cGroups.hidden = false;
        hbars(chartCard(cGroups, "groups", "dH1 by parameter group", "per-group kernels K = Σ_g K_g"), { items: groupList.map((g) => ({ label: g.name || g.group, value: isNum(g.value) ? g.value : g.delta_h1, note: isNum(g.share) ? `share ${fmtPct(g.share)}` : "" })), xLabel: "contribution to dH1 (nats)" });
      } else {
        cGroups.hidden = true;
        cGroups.replaceChildren();
      }

      const meta = new Map(diagonal.map((d) => [d.id, d]));
      const seqs = sequenceRows(e, meta).filter((r) => isNum(r.contribution));
      seqs.sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution));
      const top = seqs.slice(0, 100);
      table.replaceChildren(
        el("h3", { text: "Sequences that drive entropy most" }),
        el("p", { class: "sub", text: `the ${top.length} of ${seqs.length} sequences with the largest |contribution| to dH1 (a_i for update sequences, b_j for entropy sequences; negative = entropy collapse). Click a header to sort.` }),
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
              { key: "contribution", label: "contribution (nats)", num: true, fmt: (v) => el("span", { class: v < 0 ? "neg" : "pos", text: fmt(v) }) },
            ],
            seqSort,
          ),
        ),
      );
      table.dataset.chart = "sequences";
    }

    return {
      async refresh() {
        const status = await api(base);
        const s = JSON.stringify(status);
        if (s === statusSig) return;
        drawHead(status);
        if (status.state !== "ready") {
          statusSig = s;
          if (!data) summary.replaceChildren(el("p", { class: "empty", text: status.state === "pending" ? "Waiting for the workers to sketch the queued uploads…" : "This step failed: see the errors above." }));
          return;
        }
        // the status says ready, so these answer at once; ?wait covers a race with a new upload
        const [spectrum, blocks, diagonal, entropy] = await Promise.all([
          api(`${base}/kernel/spectrum?wait=10`),
          api(`${base}/kernel/blocks?wait=10`),
          api(`${base}/kernel/diagonal?wait=10`),
          api(`${base}/entropy?wait=10`),
        ]);
        data = { spectrum, blocks, diagonal: Array.isArray(diagonal) ? diagonal : diagonal.diagonal || diagonal.entries || [], entropy };
        statusSig = s;
        draw();
      },
      redraw() {
        if (data) draw();
      },
    };
  }

  /** "A > 0, S above prompt mean" from {advantage: positive|negative, logprob: above_mean|below_mean}. */
  function quadrantLabel(q) {
    if (q.advantage && q.logprob) {
      const a = q.advantage === "positive" ? "A > 0" : q.advantage === "negative" ? "A ≤ 0" : `A ${q.advantage}`;
      const l = String(q.logprob).startsWith("above") ? "S above prompt mean" : String(q.logprob).startsWith("below") ? "S ≤ prompt mean" : `S ${q.logprob}`;
      return `${a}, ${l}`;
    }
    return String(q.name || "").replace(/_/g, " ");
  }

  // ---------------------------------------------------------------- routing and polling
  function route() {
    const hash = location.hash.replace(/^#/, "");
    const path = hash || (location.pathname.startsWith("/runs/") ? location.pathname : "/");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] === "runs" && parts.length >= 4 && parts[2] === "steps") return stepPage(parts[1], Number(parts[3]));
    if (parts[0] === "runs" && parts.length >= 2) return runPage(parts[1]);
    return runsPage();
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
    const input = document.getElementById("token-input");
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    else sessionStorage.removeItem(TOKEN_KEY);
    input.value = "";
    start();
  });
  window.addEventListener("hashchange", start);
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => page && page.redraw && page.redraw(), 150);
  });
  start();
})();
