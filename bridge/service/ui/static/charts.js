/* Trend charts and sparklines of the patient page's results (docs/ui.md, "Patient page").
 *
 * Each <figure class="trend"> holds a table of its points (rows with data-date, data-value, data-flag)
 * and may carry data-low / data-high, the lab's reference range. This script draws that same table as
 * an SVG chart: the reference band, the line, each point, and each flag as text (H, L, ...). A
 * <span class="spark" data-series="<figure id>"> gets a small line of the same points. Without this
 * script the page still shows the grid and the tables. Text goes in with textContent only, styles by
 * class (the CSP allows no inline style), and one figure is one test in one unit: never two axes. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function num(value) {
    var x = parseFloat(value);
    return isFinite(x) ? x : null;
  }

  function readPoints(figure) {
    var rows = figure.querySelectorAll(".trend-table tbody tr[data-value]");
    var out = [];
    Array.prototype.forEach.call(rows, function (row) {
      var value = num(row.getAttribute("data-value"));
      var date = row.getAttribute("data-date") || "";
      var t = Date.parse(date);
      if (value === null || !isFinite(t)) { return; }
      out.push({ t: t, date: date, value: value, flag: row.getAttribute("data-flag") || "" });
    });
    out.sort(function (a, b) { return a.t - b.t; });
    return out;
  }

  function scales(pts, low, high, box) {
    var ys = pts.map(function (p) { return p.value; });
    if (low !== null) { ys.push(low); }
    if (high !== null) { ys.push(high); }
    var ymin = Math.min.apply(null, ys), ymax = Math.max.apply(null, ys);
    var pad = (ymax - ymin) * 0.1 || Math.abs(ymax) * 0.1 || 1;
    ymin -= pad; ymax += pad;
    var tmin = pts[0].t, tmax = pts[pts.length - 1].t;
    return {
      x: function (t) {
        return tmax === tmin ? box.left + box.width / 2 : box.left + (t - tmin) / (tmax - tmin) * box.width;
      },
      y: function (v) { return box.top + (ymax - v) / (ymax - ymin) * box.height; },
      ymin: ymin, ymax: ymax
    };
  }

  function band(svg, s, low, high, box, cls) {
    if (low === null && high === null) { return; }
    var top = high === null ? box.top : s.y(high);
    var bottom = low === null ? box.top + box.height : s.y(low);
    svg.appendChild(el("rect", { "class": cls, x: box.left, y: top, width: box.width, height: Math.max(0, bottom - top) }));
  }

  function line(svg, s, pts, cls) {
    var coords = pts.map(function (p) { return s.x(p.t).toFixed(1) + "," + s.y(p.value).toFixed(1); });
    svg.appendChild(el("polyline", { "class": cls, points: coords.join(" ") }));
  }

  function fmt(x) { return String(Math.round(x * 1000) / 1000); }

  function trend(figure) {
    var pts = readPoints(figure);
    var holder = figure.querySelector(".chart");
    if (!pts.length || !holder) { return; }
    var low = num(figure.getAttribute("data-low")), high = num(figure.getAttribute("data-high"));
    var unit = figure.getAttribute("data-unit") || "";
    var W = 640, H = 220, box = { left: 56, top: 16, width: W - 56 - 24, height: H - 16 - 40 };
    var s = scales(pts, low, high, box);
    var caption = figure.querySelector("figcaption");
    var svg = el("svg", { "class": "trend-chart", viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": (caption ? caption.textContent : "Trend") + ": " + pts.length + " values; the table below has them" });
    band(svg, s, low, high, box, "band");
    svg.appendChild(el("line", { "class": "axis", x1: box.left, y1: box.top, x2: box.left, y2: box.top + box.height }));
    svg.appendChild(el("line", { "class": "axis", x1: box.left, y1: box.top + box.height, x2: box.left + box.width, y2: box.top + box.height }));
    [s.ymin, s.ymax].forEach(function (v) {
      svg.appendChild(el("text", { "class": "tick", x: box.left - 6, y: s.y(v) + 4, "text-anchor": "end" }, fmt(v)));
    });
    if (low !== null) { svg.appendChild(el("text", { "class": "tick band-label", x: box.left + box.width, y: s.y(low) - 3, "text-anchor": "end" }, "low " + fmt(low))); }
    if (high !== null) { svg.appendChild(el("text", { "class": "tick band-label", x: box.left + box.width, y: s.y(high) - 3, "text-anchor": "end" }, "high " + fmt(high))); }
    svg.appendChild(el("text", { "class": "tick", x: 4, y: box.top + 4 }, unit));
    var first = pts[0], last = pts[pts.length - 1];
    svg.appendChild(el("text", { "class": "tick", x: s.x(first.t), y: H - 12, "text-anchor": pts.length > 1 ? "start" : "middle" }, first.date.slice(0, 10)));
    if (pts.length > 1) { svg.appendChild(el("text", { "class": "tick", x: s.x(last.t), y: H - 12, "text-anchor": "end" }, last.date.slice(0, 10))); }
    line(svg, s, pts, "line");
    pts.forEach(function (p) {
      var flagged = p.flag && p.flag !== "N";
      var dot = el("circle", { "class": flagged ? "point out" : "point", cx: s.x(p.t), cy: s.y(p.value), r: 4 });
      dot.appendChild(el("title", {}, p.date + ": " + fmt(p.value) + " " + unit + (p.flag ? " (" + p.flag + ")" : "")));
      svg.appendChild(dot);
      if (flagged) {
        svg.appendChild(el("text", { "class": "flag", x: s.x(p.t), y: s.y(p.value) - 9, "text-anchor": "middle" }, p.flag));
      }
    });
    holder.appendChild(svg);
  }

  function spark(span) {
    var figure = document.getElementById(span.getAttribute("data-series") || "");
    if (!figure) { return; }
    var pts = readPoints(figure);
    if (!pts.length) { return; }
    var low = num(figure.getAttribute("data-low")), high = num(figure.getAttribute("data-high"));
    var box = { left: 2, top: 2, width: 96, height: 20 };
    var s = scales(pts, low, high, box);
    var svg = el("svg", { "class": "spark-chart", viewBox: "0 0 100 24", "aria-hidden": "true", focusable: "false" });
    band(svg, s, low, high, box, "band");
    line(svg, s, pts, "line");
    var last = pts[pts.length - 1];
    svg.appendChild(el("circle", { "class": last.flag && last.flag !== "N" ? "point out" : "point", cx: s.x(last.t), cy: s.y(last.value), r: 2 }));
    span.appendChild(svg);
  }

  function draw(root) {
    Array.prototype.forEach.call(root.querySelectorAll("figure.trend"), function (f) {
      if (!f.querySelector("svg")) { trend(f); }
    });
    Array.prototype.forEach.call(root.querySelectorAll(".spark[data-series]"), function (sp) {
      if (!sp.querySelector("svg")) { spark(sp); }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { draw(document); });
  } else {
    draw(document);
  }
})();
