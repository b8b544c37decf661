/* SVG chart helpers: an x-y chart with error bars and flags, a heatmap, a histogram,
 * horizontal bars, each drawn into a titled card (chartCard).  No chart library: every chart is
 * plain SVG, sized to its card's width at draw time (a page redraws on resize).
 */
import { el, fmt, isNum } from "./dom.js";

const SVG_NS = "http://www.w3.org/2000/svg";

export const COLORS = {
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

export function svg(tag, attrs, parent) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  if (parent) parent.append(node);
  return node;
}

export function tip(node, text) {
  svg("title", { text }, node);
  return node;
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


const chartIds = { n: 0 };

/** Replace the contents of `box` with a titled chart card; returns the body element. */
export function chartCard(box, name, title, subtitle) {
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
  const swatch = (it) => {
    const node = el("span", { class: `swatch ${it.kind || "dot"}` });
    // through the CSSOM: the page's Content-Security-Policy refuses style attributes
    node.style.setProperty("--c", it.color);
    return node;
  };
  return el(
    "div",
    { class: "legend" },
    items.map((it) => el("span", { class: "legend-item" }, swatch(it), it.label)),
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
 * Markers are <circle class="pt" data-series=name data-x data-y> (a <rect> or <path> for shape
 * "square" / "diamond"), one per point with a finite y, carrying the point's exact values; error bars are <g class="errbar"
 * data-series=name>.  A `flag` series has no y: its points are hollow markers in a lane under
 * the plot, off the value axis (<... class="flag" data-series=name>), for x that have no
 * value to draw.
 * yInclude: values the y axis covers even without a point there.
 * errClip: error bars reach at most this many times the span of the points (reference lines,
 * yInclude) beyond it, so that one huge bar does not flatten the others; a cut end has an
 * arrow.
 */
export function xyChart(body, opts) {
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
        const c = marker(plot, s.shape, sx(p.x), sy(p.y), s.radius || 3.5, { fill: s.color, class: "pt", "data-series": s.name, "data-x": p.x, "data-y": p.y });
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
export function heatmap(body, opts) {
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
export function histogram(body, opts) {
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

/** Horizontal bars around zero, one row per item; bars are <rect class="hbar" data-label data-value>. */
export function hbars(body, opts) {
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
    const r = svg("rect", { x: Math.min(x0, x1), y, width: Math.max(1, Math.abs(x1 - x0)), height: row - 8, fill: it.value < 0 ? COLORS.neg : COLORS.pos, class: "hbar", "data-label": it.label, "data-value": it.value }, root);
    tip(r, `${it.label}: ${fmt(it.value)}${it.note ? ` (${it.note})` : ""}`);
    svg("text", { x: labelW - 6, y: y + row / 2, "text-anchor": "end", class: "tick", text: it.label }, root);
    if (it.note) svg("text", { x: labelW + plotW + 8, y: y + row / 2, class: "tick small", text: it.note }, root);
  }
  svg("line", { x1: sx(0), x2: sx(0), y1: top, y2: plotBottom, stroke: "#333" }, root);
  svg("text", { x: labelW + plotW / 2, y: height - 6, "text-anchor": "middle", class: "axis-label", text: opts.xLabel }, root);
  body.append(root);
}
