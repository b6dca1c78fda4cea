// Live charts of the Governance page: asks the console for the component's
// points once a second and draws, per method, calls and errors per second
// and the p99 as SVG. A p99 point that carries an exemplar is a dot linking
// to its trace when the console knows a trace UI. No library, no build step.
"use strict";

(function () {
  const root = document.getElementById("charts");
  if (!root) return;
  const src = root.dataset.src;
  const NS = "http://www.w3.org/2000/svg";
  const W = 440, H = 102, PAD = 34;

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "-";
    return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }

  // One chart: lines of [t, value] (value null for a gap), scaled together.
  function chart(title, lines, t0, t1, dots, traceUrl) {
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    let max = 0;
    for (const l of lines) for (const [, v] of l.points) if (v !== null && v > max) max = v;
    for (const d of dots) if (d.v > max) max = d.v;
    max = max > 0 ? max * 1.1 : 1;
    const x = (t) => PAD + ((t - t0) / Math.max(1, t1 - t0)) * (W - PAD - 6);
    const y = (v) => H - 16 - (v / max) * (H - 30);
    el("line", { x1: PAD, y1: H - 16, x2: W - 6, y2: H - 16, stroke: "#bbb" }, svg);
    el("text", { x: 2, y: 12, "font-size": 10, fill: "#555" }, svg).textContent = fmt(max);
    el("text", { x: 2, y: H - 18, "font-size": 10, fill: "#555" }, svg).textContent = "0";
    el("text", { x: PAD, y: H - 3, "font-size": 10, fill: "#555" }, svg).textContent = title;
    for (const l of lines) {
      const pts = l.points.filter(([, v]) => v !== null).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
      if (pts.length) el("polyline", { points: pts.join(" "), fill: "none", stroke: l.color, "stroke-width": 1.5 }, svg);
    }
    for (const d of dots) {
      const parent = traceUrl ? el("a", { href: traceUrl.replace("{trace_id}", d.trace_id), class: "exemplar", "data-trace": d.trace_id, target: "_blank" }, svg) : svg;
      const c = el("circle", { cx: x(d.t).toFixed(1), cy: y(d.v).toFixed(1), r: 3.5, fill: "#b3261e" }, parent);
      el("title", {}, c).textContent = `${d.v.toFixed(1)} ms, trace ${d.trace_id}`;
    }
    return svg;
  }

  function render(data) {
    const points = data.points || [];
    if (points.length === 0) return;
    const methods = new Set();
    for (const p of points) for (const m of Object.keys(p.methods)) methods.add(m);
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const last = points[points.length - 1];
    const frag = document.createDocumentFragment();
    const table = document.createElement("table");
    table.className = "live";
    table.innerHTML = "<tr><th>Method</th><th>Calls/s</th><th>Errors/s</th><th>p99 ms</th><th>Charts</th></tr>";
    for (const m of [...methods].sort()) {
      const series = points.map((p) => [p.t, p.methods[m] || null]);
      const now = last.methods[m];
      const tr = document.createElement("tr");
      tr.dataset.method = m;
      const cells = [m, fmt(now ? now.calls : 0), fmt(now ? now.errors : 0), fmt(now ? now.p99_ms : null)];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        td.className = ["mono", "num calls-now", "num errors-now", "num p99-now"][i];
        tr.appendChild(td);
      });
      const td = document.createElement("td");
      td.appendChild(chart("calls/s (blue), errors/s (red)", [
        { color: "#1a4f8b", points: series.map(([t, v]) => [t, v ? v.calls : 0]) },
        { color: "#b3261e", points: series.map(([t, v]) => [t, v ? v.errors : 0]) },
      ], t0, t1, [], null));
      const dots = series.filter(([, v]) => v && v.exemplar).map(([t, v]) => ({ t, v: v.exemplar.ms, trace_id: v.exemplar.trace_id }));
      td.appendChild(chart("p99 ms", [{ color: "#333", points: series.map(([t, v]) => [t, v ? v.p99_ms : null]) }], t0, t1, dots, data.trace_url || null));
      tr.appendChild(td);
      table.appendChild(tr);
    }
    frag.appendChild(table);
    const note = document.createElement("p");
    note.className = "muted";
    note.id = "charts-note";
    note.dataset.points = String(points.length);
    note.textContent = `${points.length} points over ${((t1 - t0) / 1000).toFixed(0)} s from ${data.instances} instance(s)` +
      (data.unreachable && data.unreachable.length ? `; unreachable: ${data.unreachable.join(", ")}` : "");
    frag.appendChild(note);
    root.replaceChildren(frag);
  }

  async function tick() {
    try {
      const r = await fetch(src, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) render(await r.json());
    } catch (e) {
      // The next tick tries again; the last chart stays.
    }
    setTimeout(tick, 1000);
  }
  tick();
})();
