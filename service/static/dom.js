/* HTML elements, number formatting and the sortable table shared by the pages. */

/** An HTML element: attrs (class, text, on<event> handlers, plain attributes), then children. */
export function el(tag, attrs, ...children) {
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

export const isNum = (v) => typeof v === "number" && Number.isFinite(v);

/** A short, readable number: 3 significant digits, exponent form for very small/large. */
export function fmt(v, digits = 3) {
  if (!isNum(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) {
    const [m, e] = v.toExponential(digits - 1).split("e");
    return `${m.replace(/\.?0+$/, "")}e${Number(e)}`;
  }
  return String(Number(v.toPrecision(digits)));
}

export function fmtPct(v) {
  return isNum(v) ? `${(100 * v).toFixed(1)} %` : "–";
}

/** Local date and time of unix seconds. */
export const when = (t) => new Date(t * 1000).toLocaleString();

/**
 * A table whose headers sort it (click: descending, again: ascending).
 * columns: [{key, label, num?, fmt?, title?}]; rows: objects; state: {key, dir}, owned by
 * the page and updated in place, so a redraw (new data, resize) keeps the user's order.
 */
export function sortableTable(rows, columns, state) {
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
