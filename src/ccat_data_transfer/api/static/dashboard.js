/* CCAT dashboard charts: fetch a JSON endpoint, draw an inline SVG.  No libraries. */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#5aa9e6", "#3fb97a", "#c792ea", "#f78c6c", "#89ddff", "#ffcb6b", "#ff5370", "#c3e88d"];

  function el(name, attrs, parent, text) {
    var node = document.createElementNS(SVGNS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function humanBytes(n) {
    var units = ["B", "kB", "MB", "GB", "TB", "PB"], v = n, i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return i === 0 ? v.toFixed(0) + " B" : v.toFixed(v >= 100 ? 0 : 1) + " " + units[i];
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v))), f = v / p;
    var nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
    return nf * p;
  }

  function parseUtc(s) { return new Date(s + "Z"); }

  function fmtTime(d, spanHours) {
    var pad = function (x) { return (x < 10 ? "0" : "") + x; };
    var md = pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate());
    var hm = pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
    if (spanHours <= 24) return hm;
    return spanHours <= 24 * 7 ? md + " " + hm : md;
  }

  function noData(area, text) {
    area.innerHTML = "";
    var p = document.createElement("p");
    p.className = "nodata";
    p.textContent = text;
    area.appendChild(p);
  }

  // The figure's chart area, with the item count on the figure (the tests read it); null
  // (and a line saying so) when there is nothing to draw.
  function chartArea(fig, countKey, items, emptyText) {
    var area = fig.querySelector(".chart-area");
    fig.dataset[countKey] = String(items.length);
    if (!items.length) { noData(area, emptyText); return null; }
    return area;
  }

  // A fresh W x H drawing in the chart area, labelled for screen readers.
  function newSvg(area, W, H, label) {
    area.innerHTML = "";
    return el("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label }, area);
  }

  function drawLines(fig, data) {
    var series = data.series || [];
    var area = chartArea(fig, "series", series, fig.dataset.empty || "No buffer sample in this window.");
    if (!area) return;
    var W = 1000, H = 320, L = 48, R = 16, T = 12, B = 30;
    var end = Date.now(), start = parseUtc(data.since).getTime();
    var x = function (t) { return L + (t - start) / (end - start) * (W - L - R); };
    var y = function (p) { return T + (1 - Math.min(p, 100) / 100) * (H - T - B); };
    var svg = newSvg(area, W, H, (fig.dataset.label || "Buffer use") + " over time, percent");
    [0, 25, 50, 75, 100].forEach(function (p) {
      el("line", { x1: L, x2: W - R, y1: y(p), y2: y(p), "class": "grid" }, svg);
      el("text", { x: L - 8, y: y(p) + 4, "text-anchor": "end" }, svg, p + "%");
    });
    for (var i = 0; i <= 6; i++) {
      var t = start + (end - start) * i / 6;
      el("text", { x: x(t), y: H - 8, "text-anchor": i === 0 ? "start" : i === 6 ? "end" : "middle" },
        svg, fmtTime(new Date(t), data.hours));
    }
    var th = data.thresholds;
    ["warning", "critical", "emergency"].forEach(function (k) {
      el("line", { x1: L, x2: W - R, y1: y(th[k]), y2: y(th[k]), "class": "th-" + k,
        "stroke-dasharray": "6 5", "stroke-width": 1.5 }, svg);
      // Labels sit at the left edge: the newest values (right edge) stay unobscured.
      el("text", { x: L + 6, y: y(th[k]) - 4, "class": "th-label" }, svg, k + " " + th[k] + "%");
    });
    var legend = document.createElement("div");
    legend.className = "legend-row";
    series.forEach(function (s, idx) {
      var colour = PALETTE[idx % PALETTE.length];
      var pts = s.points.map(function (p) {
        return x(parseUtc(p.t).getTime()).toFixed(1) + "," + y(p.percent).toFixed(1);
      });
      var line = el("polyline", { points: pts.join(" "), fill: "none", stroke: colour,
        "stroke-width": 2.2, "stroke-linejoin": "round", "data-location": s.location }, svg);
      el("title", {}, line, s.location);
      if (s.points.length === 1) {
        var p0 = s.points[0];
        el("circle", { cx: x(parseUtc(p0.t).getTime()), cy: y(p0.percent), r: 3, fill: colour }, svg);
      }
      var last = s.points[s.points.length - 1];
      var item = document.createElement("span");
      item.innerHTML = '<span class="swatch"></span>';
      item.firstChild.style.background = colour;
      item.appendChild(document.createTextNode(s.location + " " + last.percent.toFixed(1) + "%"));
      legend.appendChild(item);
    });
    area.appendChild(legend);
  }

  function drawBars(fig, data) {
    var days = data.days || [];
    var area = chartArea(fig, "bars", days, "No day in range.");
    if (!area) return;
    var W = 1000, H = 280, L = 70, R = 16, T = 14, B = 30;
    var max = niceMax(Math.max.apply(null, days.map(function (d) { return d.bytes; })));
    var slot = (W - L - R) / days.length, bw = Math.max(2, slot * 0.7);
    var y = function (v) { return T + (1 - v / max) * (H - T - B); };
    var svg = newSvg(area, W, H, "Bytes transferred per day");
    for (var i = 0; i <= 4; i++) {
      var v = max * i / 4;
      el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), "class": "grid" }, svg);
      el("text", { x: L - 8, y: y(v) + 4, "text-anchor": "end" }, svg, humanBytes(v));
    }
    var every = Math.ceil(days.length / 14);
    days.forEach(function (d, idx) {
      var bx = L + idx * slot + (slot - bw) / 2;
      var h = (H - T - B) * d.bytes / max;
      var bar = el("rect", { x: bx.toFixed(1), y: (H - B - h).toFixed(1), width: bw.toFixed(1),
        height: Math.max(h, d.bytes > 0 ? 1 : 0).toFixed(1), rx: 2, "class": "bar",
        "data-day": d.day, "data-bytes": d.bytes }, svg);
      el("title", {}, bar, d.day + ": " + humanBytes(d.bytes) + " in " + d.transfers + " transfers");
      if (idx % every === 0 || idx === days.length - 1) {
        el("text", { x: bx + bw / 2, y: H - 8, "text-anchor": "middle" }, svg, d.day.slice(5));
      }
    });
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis" }, svg);
  }

  function load(fig) {
    var draw = fig.dataset.chart === "bars" ? drawBars : drawLines;
    fetch(fig.dataset.src, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) { draw(fig, data); fig.dataset.rendered = "true"; })
      .catch(function (err) {
        noData(fig.querySelector(".chart-area"), "Could not load chart data: " + err.message);
        fig.dataset.rendered = "error";
      });
  }

  document.querySelectorAll("figure.chart[data-src]").forEach(load);
})();
