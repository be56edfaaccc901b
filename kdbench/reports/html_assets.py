"""The stylesheet and the script inlined into every HTML report (no file, font or CDN is fetched).

The page reads without the script; the script only makes table headers sort their rows.
Colours follow the reader's system setting (``prefers-color-scheme``); ``@media print`` drops
the navigation and keeps tables and figures whole on a page where they fit.
"""

from __future__ import annotations

#: nothing may be fetched: no network, no file; inline style and script, images as data: URIs
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
:root {
  color-scheme: light dark;
  --bg: #ffffff; --fg: #1d2327; --muted: #5b6770; --line: #d5dbe0; --head: #f2f5f7;
  --stripe: #fafbfc; --accent: #1f5fbf; --best: #e7f1dc; --bad: #b3261e; --badbg: #fbeaea;
  --warnbg: #fff4d6;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #15191c; --fg: #e3e7ea; --muted: #9aa5ad; --line: #39424a; --head: #1e2429;
    --stripe: #1a1f23; --accent: #7fb0ff; --best: #23361c; --bad: #ff8a80; --badbg: #3a1f1f;
    --warnbg: #3a3218;
  }
  /* charts are drawn dark-on-transparent: turn them light, keep their hues */
  figure.chart svg { filter: invert(0.88) hue-rotate(180deg); }
}
* { box-sizing: border-box; }
body {
  margin: 0 auto; max-width: 1200px; padding: 1.5rem 1.25rem 3rem; background: var(--bg);
  color: var(--fg); font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 {
  font-size: 1.25rem; margin: 2.2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line);
}
h3 { font-size: 1.02rem; margin: 1.4rem 0 .4rem; }
a { color: var(--accent); }
.sub, .notes, figcaption, .protocol { color: var(--muted); }
nav { margin: .6rem 0 1rem; display: flex; flex-wrap: wrap; gap: .3rem .9rem; font-size: .92rem; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .8rem 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; }
.scroll { overflow-x: auto; margin: .4rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: .9rem; }
th, td { padding: .28rem .6rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: var(--head); font-weight: 600; position: sticky; top: 0; white-space: nowrap; }
td.stat, td.number { text-align: right; white-space: nowrap; }
td.text { white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--stripe); }
tr.rule td { border-bottom: 2px solid var(--muted); }
table[data-sorted] tr.rule td { border-bottom: 1px solid var(--line); }
td.best { background: var(--best); }
td.best strong { font-weight: 700; }
.mark { color: var(--muted); cursor: help; }
th.sort { cursor: pointer; user-select: none; }
th.sort::after { content: " \\2195"; color: var(--muted); font-weight: 400; }
th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
td.failed { color: var(--bad); background: var(--badbg); }
.banner { background: var(--warnbg); padding: .5rem .8rem; border-radius: 4px; font-weight: 600; }
ul.notes, ul.protocol { margin: .4rem 0; padding-left: 1.2rem; font-size: .88rem; }
figure { margin: .8rem 0; }
figure.chart svg { max-width: 100%; height: auto; }
figure.image img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figure.samples img { image-rendering: pixelated; }  /* small images shown larger: keep the pixels */
.gallery { display: flex; flex-wrap: wrap; gap: 1rem; }
.gallery figure { flex: 0 1 auto; max-width: 100%; }
details { margin: .3rem 0; }
pre { background: var(--head); padding: .6rem; overflow-x: auto; font-size: .8rem; white-space: pre-wrap; }
footer { margin-top: 3rem; font-size: .8rem; color: var(--muted); }
@media print {
  body { max-width: none; padding: 0; background: #fff; color: #000; font-size: 10pt; }
  nav, th.sort::after { display: none; }
  thead th { position: static; }
  .scroll { overflow: visible; }
  section, figure, tr { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
  figure.chart svg { filter: none; }
  details > * { display: block; }
  a { color: inherit; text-decoration: none; }
}
"""

#: click (or Enter on) a header to sort by it: numbers by their exact value (data-value),
#: text otherwise, missing values always last; a second click reverses
JS = """
(function () {
  function key(td) {
    if (!td) return [2, ""];
    var v = td.getAttribute("data-value");
    if (v !== null && v !== "") return [0, parseFloat(v)];
    var s = td.textContent.trim();
    return [s === "" || s === "\\u2014" ? 2 : 1, s.toLowerCase()];
  }
  function sortBy(table, heads, th, i) {
    var asc = th.getAttribute("aria-sort") !== "ascending";
    for (var h = 0; h < heads.length; h++) heads[h].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    table.setAttribute("data-sorted", "");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[i]), y = key(b.cells[i]);
      if (x[0] !== y[0]) return x[0] - y[0];
      var c = x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      th.classList.add("sort");
      th.tabIndex = 0;
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortBy(table, heads, th, i); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, heads, th, i); }
      });
    });
  });
})();
"""
