// lfgraph report page: draws the data in <script id="lfgraph-data"> (schema lfgraph.visualize/1).
// Plain DOM and SVG, no library, no network.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("lfgraph-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const $ = (sel, root) => (root || document).querySelector(sel);

  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v; else if (k === "cls") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }
  function svg(tag, attrs, children) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  }
  function title(text) { const t = svg("title"); t.textContent = text; return t; }
  function fmtInt(n) { return n.toLocaleString("en-US"); }
  function fmtParams(n) { return n >= 1e6 ? (n / 1e6).toFixed(2) + "M" : n >= 1e3 ? (n / 1e3).toFixed(1) + "k" : String(n); }
  function fmt(v) { return v === null || v === undefined ? "–" : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toPrecision(4).replace(/\.?0+$/, ""); }
  function short(name) { const p = name.split("."); return p.length > 2 ? p.slice(-2).join(".") : name; }
  function shortRole(role, name) {
    const r = role || name; if (r.length <= 28) return r;
    const p = r.split("."); const s = p.length > 2 ? p.slice(-2).join(".") : r;
    return s.length > 26 ? "…" + s.slice(-25) : s;
  }

  // ------------------------------------------------------------------ header and counts
  document.title = D.title;
  $("#title").textContent = D.title;
  const c = D.counts;
  const facts = [
    ["blocks", c.blocks_before + " → " + c.blocks_after],
    ["removed", c.removed], ["merged into", c.merged], ["tied layers", c.tied + (c.tie_sets ? " in " + c.tie_sets + " sets" : "")],
    ["refitted layers", c.refitted], ["permuted blocks", c.permuted], ...(c.healed ? [["healed layers", c.healed]] : []),
  ];
  const factBox = $("#facts");
  for (const [k, v] of facts) factBox.appendChild(el("span", { cls: "fact", "data-count": k }, [el("b", { text: String(v) }), " " + k]));
  if (!D.from_log) factBox.appendChild(el("span", { cls: "fact warn", text: "no rewrite log: showing what the plan asks for" }));
  const prov = D.provenance || {};
  $("#subtitle").textContent = [D.model && "model " + D.model, D.source && "source " + D.source, "mode " + D.mode,
    "fuse " + D.fuse, prov.select && "selection " + prov.select, prov.metric && "metric " + prov.metric,
    prov.target !== undefined && "target " + prov.target + " of " + (prov.target_kind || "blocks")].filter(Boolean).join(" · ");

  // ------------------------------------------------------------------ the two columns
  const tieColor = (t) => D.tie_sets[t].color;
  const rowOfLayer = {};
  for (const r of D.rows) for (const l of r.layers) rowOfLayer[l.name] = r;
  // where a tied layer's shared weight lives: the kept layer's block (its role is the same)
  const keepLabel = (t) => { const k = D.tie_sets[t].keep, r = rowOfLayer[k]; return r && r.kind === "block" ? short(r.name) : short(k); };
  const expanded = new Set();
  const grid = $("#graph");
  const before = $("#before"), after = $("#after");
  const overlay = $("#links");

  function layerChip(l, side, row) {
    const chip = el("div", { cls: "layer" + (l.tie !== null ? " tied" : "") + (l.refit && side === "after" ? " refit" : ""), "data-layer": l.name,
      "data-tie": l.tie !== null ? l.tie : null,
      title: l.name + "\n" + l.op + " " + l.shape.join("×") + ", " + fmtInt(l.params) + " parameters" +
        (l.tie !== null ? "\ntie set " + (l.tie + 1) + (l.tie_keep ? " (its weight is kept)" : ": shares the weight of " + D.tie_sets[l.tie].keep) : "") +
        (l.refit ? "\nrefitted on calibration data" : "") }, [
      el("span", { cls: "swatch", style: l.tie !== null ? "background:" + tieColor(l.tie) : null }),
      el("span", { cls: "role", text: shortRole(row.kind === "layers" ? l.name : l.role, l.name) }),
      el("span", { cls: "shape", text: l.shape.join("×") }),
      l.refit && side === "after" ? el("span", { cls: "badge refit", text: "refit" }) : null,
      l.healed && side === "after" ? el("span", { cls: "badge refit", text: "healed" }) : null,
      l.tie !== null && !l.tie_keep && side === "after" ? el("span", { cls: "badge tie", style: "border-color:" + tieColor(l.tie), text: "= " + keepLabel(l.tie), title: "shares the weight of " + D.tie_sets[l.tie].keep }) : null,
    ]);
    return chip;
  }

  function rowEl(r, side) {
    const removed = r.fate === "removed";
    const badges = [];
    if (r.kind === "block") {
      if (side === "before" && removed) badges.push(el("span", { cls: "badge gone", text: "→ " + short(r.absorbed_by) }));
      if (r.absorbs.length && side === "after") badges.push(el("span", { cls: "badge merged", title: "absorbed: " + r.absorbs.join(", "), text: "⊕ " + r.absorbs.length + " absorbed" }));
      if (r.absorbs.length && side === "before") badges.push(el("span", { cls: "badge keeper", text: "keeps " + r.absorbs.length }));
      if (side === "after" && r.fused) badges.push(el("span", { cls: "badge", text: "fused: " + (r.fused.rule || D.fuse) + (r.fused.aligned ? ", aligned" : "") }));
      if (side === "after" && r.refit) badges.push(el("span", { cls: "badge refit", text: "refit " + r.refit }));
      if (side === "after" && r.healed) badges.push(el("span", { cls: "badge refit", text: "healed" }));
      if (side === "after" && r.permuted) badges.push(el("span", { cls: "badge", title: r.permuted[0] + " of " + r.permuted[1] + " hidden units moved to align", text: "permuted" }));
      if (r.plan_score !== null && (removed || r.absorbs.length) && side === "before") badges.push(el("span", { cls: "score", text: "score " + fmt(r.plan_score) }));
    }
    const ties = [...new Set(r.layers.filter((l) => l.tie !== null).map((l) => l.tie))];
    const dots = el("span", { cls: "dots" }, ties.slice(0, 12).map((t) => el("span", { cls: "dot", "data-tie": t, style: "background:" + tieColor(t), title: "tie set " + (t + 1) })));
    const head = el("div", { cls: "head", tabindex: "0", role: "button", "aria-expanded": "false" }, [
      el("span", { cls: "caret", text: "▸" }),
      el("span", { cls: "name", text: r.kind === "block" ? short(r.name) : r.name, title: r.name }),
      el("span", { cls: "meta", text: r.layers.length + (r.layers.length === 1 ? " layer · " : " layers · ") + fmtParams(r.params) }),
      dots, ...badges,
    ]);
    const layers = el("div", { cls: "layers" }, r.layers.map((l) => layerChip(l, side, r)));
    const row = el("div", { cls: "row k-" + r.kind + " " + r.fate + (r.refit || r.healed ? " refitted" : ""), "data-row": r.name, "data-side": side, "data-fate": r.fate }, [head, layers]);
    head.addEventListener("click", () => toggle(r.name));
    head.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); toggle(r.name); } });
    return row;
  }

  function toggle(name, on) {
    const open = on === undefined ? !expanded.has(name) : on;
    if (open) expanded.add(name); else expanded.delete(name);
    document.querySelectorAll('.row[data-row="' + CSS.escape(name) + '"]').forEach((e) => {
      e.classList.toggle("open", open);
      $(".head", e).setAttribute("aria-expanded", String(open));
      $(".caret", e).textContent = open ? "▾" : "▸";
    });
    scheduleLinks();
  }

  for (const r of D.rows) {
    before.appendChild(rowEl(r, "before"));
    if (r.fate !== "removed") after.appendChild(rowEl(r, "after"));
  }
  $("#expand-all").addEventListener("click", () => { for (const r of D.rows) toggle(r.name, true); });
  $("#collapse-all").addEventListener("click", () => { for (const r of D.rows) toggle(r.name, false); });

  // links between the columns, and tie lanes right of the "after" column; redrawn on layout change
  let pending = false;
  function scheduleLinks() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; drawLinks(); }); } }
  function anchor(e, base) { const b = e.getBoundingClientRect(); return { l: b.left - base.left, r: b.right - base.left, y: b.top - base.top + Math.min(b.height, 24) / 2, t: b.top - base.top, h: b.height }; }
  function drawLinks() {
    const base = grid.getBoundingClientRect();
    overlay.setAttribute("width", base.width); overlay.setAttribute("height", base.height);
    overlay.replaceChildren(svg("defs", {}, [
      svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, [svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#c0392b" })]),
    ]));
    const afterOf = {};
    after.querySelectorAll(".row").forEach((e) => { afterOf[e.dataset.row] = e; });
    before.querySelectorAll(".row").forEach((e) => {
      const name = e.dataset.row, fate = e.dataset.fate;
      const target = afterOf[fate === "removed" ? D.rows.find((r) => r.name === name).absorbed_by : name];
      if (!target) return;
      const a = anchor($(".head", e), base), b = anchor($(".head", target), base);
      const mid = (a.r + b.l) / 2;
      const path = "M" + a.r + "," + a.y + " C" + mid + "," + a.y + " " + mid + "," + b.y + " " + (b.l - 2) + "," + b.y;
      overlay.appendChild(svg("path", fate === "removed"
        ? { d: path, class: "link removed", "marker-end": "url(#arrow)" }
        : { d: path, class: "link kept" }, [title(fate === "removed" ? short(name) + " removed: absorbed by " + short(target.dataset.row) : short(name))]));
    });
    // tie lanes: one vertical line per set joining its members (chips when open, else rows)
    const lanesX = after.getBoundingClientRect().right - base.left + 8;
    const laneEnd = [];
    D.tie_sets.forEach((t) => {
      const ys = [];
      for (const m of t.members) {
        const chip = after.querySelector('.row.open .layer[data-layer="' + CSS.escape(m) + '"]');
        const row = chip ? null : [...after.querySelectorAll(".row")].find((r) => r.querySelector('.layer[data-layer="' + CSS.escape(m) + '"]'));
        const target = chip || (row && $(".head", row));
        if (target) ys.push(anchor(target, base).y);
      }
      const uniq = [...new Set(ys.map((y) => Math.round(y)))].sort((a, b) => a - b);
      if (uniq.length < 2) return;
      let lane = laneEnd.findIndex((end) => end < uniq[0] - 4);
      if (lane < 0) { lane = laneEnd.length; laneEnd.push(0); }
      laneEnd[lane] = uniq[uniq.length - 1];
      const x = lanesX + lane * 9;
      const g = svg("g", { class: "lane", "data-tie": t.id }, [title("tie set " + (t.id + 1) + ": " + t.members.length + " layers share the weight of " + t.keep)]);
      g.appendChild(svg("line", { x1: x, x2: x, y1: uniq[0], y2: uniq[uniq.length - 1], stroke: t.color, "stroke-width": 3 }));
      for (const y of uniq) g.appendChild(svg("circle", { cx: x, cy: y, r: 3.5, fill: t.color }));
      overlay.appendChild(g);
    });
    grid.style.paddingRight = (laneEnd.length * 9 + 16) + "px";
  }
  new ResizeObserver(scheduleLinks).observe(grid);
  window.addEventListener("resize", scheduleLinks);

  // hovering a tied layer highlights its whole set
  grid.addEventListener("mouseover", (ev) => {
    const t = ev.target.closest("[data-tie]");
    grid.classList.toggle("focus", !!t);
    document.querySelectorAll("[data-tie].hl").forEach((e) => e.classList.remove("hl"));
    if (t) grid.querySelectorAll('[data-tie="' + t.dataset.tie + '"]').forEach((e) => e.classList.add("hl"));
  });

  // ------------------------------------------------------------------ heatmaps (paper's Figure 2)
  const VIRIDIS = ["#fde725", "#b5de2b", "#6ece58", "#35b779", "#1f9e89", "#26828e", "#31688e", "#3e4989", "#482878", "#440154"];
  function mix(a, b, t) {
    const pa = [1, 3, 5].map((i) => parseInt(a.slice(i, i + 2), 16)), pb = [1, 3, 5].map((i) => parseInt(b.slice(i, i + 2), 16));
    return "rgb(" + pa.map((v, i) => Math.round(v + (pb[i] - v) * t)).join(",") + ")";
  }
  function colour(t) { // viridis reversed: alike (low distance) is yellow
    const x = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    return mix(VIRIDIS[i], VIRIDIS[i + 1], x - i);
  }
  function heatmap(h, size) {
    const n = h.names.length, cell = Math.max(3, Math.floor(size / n)), w = cell * n, pad = 26;
    const off = []; h.values.forEach((row, i) => row.forEach((v, j) => { if (i !== j && v !== null) off.push(v); }));
    let lo = Math.min(...off), hi = Math.max(...off);
    if (!off.length) { lo = 0; hi = 1; } else if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) { lo = Math.min(0, lo); hi = hi > lo ? hi : lo + 1; }
    const s = svg("svg", { width: w + pad + 4, height: w + pad + 4, class: "heat", role: "img" });
    const g = svg("g", { transform: "translate(" + pad + "," + 2 + ")" });
    const chosen = new Set(h.chosen.map(([i, j]) => i + "," + j));
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      const v = h.values[i][j];
      const fill = i === j ? "#ffffff" : v === null ? "#d9d9d9" : colour((v - lo) / (hi - lo));
      g.appendChild(svg("rect", { x: j * cell, y: i * cell, width: cell, height: cell, fill: fill },
        [title(h.labels[i] + " ↔ " + h.labels[j] + ": " + (i === j ? "0" : fmt(v)) + "\n" + h.names[i] + "\n" + h.names[j])]));
    }
    for (const key of chosen) {
      const [i, j] = key.split(",").map(Number);
      for (const [a, b] of [[i, j], [j, i]]) g.appendChild(svg("rect", { x: b * cell + 0.75, y: a * cell + 0.75, width: cell - 1.5, height: cell - 1.5, class: "chosen" }));
    }
    const step = n <= 16 ? 1 : Math.ceil(n / 10);
    for (let i = 0; i < n; i += step) {
      const tx = svg("text", { x: -3, y: i * cell + cell / 2 + 3, "text-anchor": "end", class: "tick" }); tx.textContent = h.labels[i]; g.appendChild(tx);
      const ty = svg("text", { x: i * cell + cell / 2, y: w + 11, "text-anchor": "middle", class: "tick" }); ty.textContent = h.labels[i]; g.appendChild(ty);
    }
    s.appendChild(g);
    const card = el("figure", { cls: "card", "data-group": h.key || "blocks" }, [s,
      el("figcaption", {}, [el("b", { text: h.op ? shortRole(h.role, "") : h.role }), el("br"),
        (h.op ? h.op + " " + h.shape + ", " + h.family + ", " : "") + n + " " + (h.op ? "layers" : "blocks") + " · " + fmt(lo) + " … " + fmt(hi) +
        (h.chosen.length ? " · " + h.chosen.length + " fused pair" + (h.chosen.length > 1 ? "s" : "") : "")])]);
    return card;
  }
  const H = D.heatmaps;
  if (H) {
    $("#heat-metric").textContent = H.metric;
    const box = $("#heatmaps");
    if (H.blocks) box.appendChild(heatmap(H.blocks, 300));
    for (const h of H.groups) box.appendChild(heatmap(h, h.names.length > 12 ? 200 : 120));
    if (H.hidden) $("#heat-note").textContent = H.hidden + " smaller groups not shown.";
  } else {
    $("#heat-section").hidden = true;
  }

  // ------------------------------------------------------------------ selection scores
  const removedSet = new Set(D.rows.filter((r) => r.fate === "removed").map((r) => r.name));
  const blockRows = D.rows.filter((r) => r.kind === "block");
  const scoreBox = $("#scores");
  for (const [crit, per] of Object.entries(D.scores)) {
    const names = blockRows.map((r) => r.name).filter((n) => n in per);
    if (!names.length) continue;
    const vals = names.map((n) => per[n]).filter((v) => v !== null);
    if (vals.length && Math.max(...vals) === Math.min(...vals)) { // nothing to compare: say so instead of empty bars
      scoreBox.appendChild(el("div", { cls: "scorecard" }, [el("div", { cls: "caption", text: D.score_labels[crit] || crit }),
        el("span", { cls: "note", text: "all " + vals.length + " blocks score " + fmt(vals[0]) + " (no block stands out)" })]));
      continue;
    }
    const hi = Math.max(...vals, 0), lo = Math.min(...vals, 0), bw = Math.max(6, Math.min(22, Math.floor(760 / names.length))), H0 = 110;
    const s = svg("svg", { width: names.length * bw + 50, height: H0 + 34, class: "bars" });
    const y = (v) => 6 + (hi - v) / ((hi - lo) || 1) * H0;
    s.appendChild(svg("line", { x1: 44, x2: 44 + names.length * bw, y1: y(0), y2: y(0), stroke: "#888" }));
    for (const [v, a] of [[hi, "hi"], [lo, "lo"]]) { const t = svg("text", { x: 40, y: y(v) + 4, "text-anchor": "end", class: "tick" }); t.textContent = fmt(v); s.appendChild(t); }
    names.forEach((n, i) => {
      const v = per[n]; if (v === null) return;
      const x = 44 + i * bw, r = removedSet.has(n);
      s.appendChild(svg("rect", { x: x + 1, y: Math.min(y(v), y(0)), width: bw - 2, height: Math.max(1, Math.abs(y(v) - y(0))), class: r ? "bar removed" : "bar", "data-block": n },
        [title(n + ": " + fmt(v) + (r ? " (removed)" : ""))]));
      if (names.length <= 40 || i % 2 === 0) { const t = svg("text", { x: x + bw / 2, y: H0 + 22, "text-anchor": "middle", class: "tick" }); t.textContent = D.rows.find((q) => q.name === n).index; s.appendChild(t); }
    });
    scoreBox.appendChild(el("div", { cls: "scorecard" }, [el("div", { cls: "caption", text: D.score_labels[crit] || crit }), s]));
  }
  if (!scoreBox.children.length) $("#score-section").hidden = true;

  // ------------------------------------------------------------------ before/after table, healing curve, log
  const tb = $("#table");
  for (const row of D.table) tb.appendChild(el("tr", {}, row.map((v, i) => el("td", { cls: i ? "num" : "", text: v }))));
  if (!D.table.length) $("#table-section").hidden = true;

  if (D.loss_curve.length >= 2) {
    const pts = D.loss_curve.filter((p) => p[1] !== null), W = 520, Hh = 180, L = 54, B = 24;
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const X = (v) => L + (v - x0) / ((x1 - x0) || 1) * (W - L - 10), Y = (v) => 8 + (y1 - v) / ((y1 - y0) || 1) * (Hh - B - 8);
    const s = svg("svg", { width: W, height: Hh, class: "curve" });
    s.appendChild(svg("polyline", { points: pts.map((p) => X(p[0]) + "," + Y(p[1])).join(" "), class: "loss" }));
    s.appendChild(svg("line", { x1: L, x2: L, y1: 8, y2: Hh - B, stroke: "#888" }));
    s.appendChild(svg("line", { x1: L, x2: W - 10, y1: Hh - B, y2: Hh - B, stroke: "#888" }));
    for (const [txt, x, yy, a] of [[fmt(y1), L - 4, 12, "end"], [fmt(y0), L - 4, Hh - B, "end"], ["step " + x0, L, Hh - 8, "start"], ["step " + x1, W - 10, Hh - 8, "end"]]) {
      const t = svg("text", { x: x, y: yy, "text-anchor": a, class: "tick" }); t.textContent = txt; s.appendChild(t);
    }
    $("#curve").appendChild(s);
  } else {
    $("#curve-section").hidden = true;
  }

  const logBody = $("#log"), filter = $("#log-filter");
  const actions = [...new Set(D.log.map((r) => r.action))];
  for (const a of actions) filter.appendChild(el("option", { value: a, text: a + " (" + D.log.filter((r) => r.action === a).length + ")" }));
  D.log.forEach((r, i) => logBody.appendChild(el("tr", { "data-action": r.action }, [
    el("td", { cls: "num", text: String(i + 1) }), el("td", { text: r.pass }), el("td", { text: r.action }),
    el("td", {}, [el("code", { text: r.target })]), el("td", {}, [el("code", { text: r.sources.join(", ") })]),
    el("td", {}, [el("code", { text: Object.entries(r.detail).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(", ") })]),
  ])));
  filter.addEventListener("change", () => logBody.querySelectorAll("tr").forEach((tr) => { tr.hidden = filter.value !== "" && tr.dataset.action !== filter.value; }));
  $("#log-count").textContent = D.log.length ? D.log.length + " records" : "none (no rewrite log given)";

  const pb = $("#provenance");
  for (const [k, v] of Object.entries(prov).sort()) pb.appendChild(el("tr", {}, [el("th", { text: k }), el("td", {}, [el("code", { text: String(v) })])]));
  document.body.dataset.ready = "1";
})();
