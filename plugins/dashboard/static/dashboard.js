// The dashboard's few live parts: the event stream (/ui/events) updating what the page shows, and the
// transaction charts (inline SVG). Station-supplied text only ever goes in through textContent.
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";

  function each(selector, root, fn) {
    Array.prototype.forEach.call((root || document).querySelectorAll(selector), fn);
  }

  function rowsOf(stationId) {
    var found = [];
    each("[data-station]", document, function (el) {
      if (el.getAttribute("data-station") === stationId) { found.push(el); }
    });
    return found;
  }

  // A station this page does not list (another page, or new): say so, with a link, rather than reorder rows.
  function notice(stationId, online) {
    var note = document.getElementById("live-notice");
    if (!note) { return; }
    note.textContent = "";
    var link = document.createElement("a");
    link.href = "/ui/stations/" + encodeURIComponent(stationId);
    link.textContent = stationId;
    note.appendChild(document.createTextNode("Not on this page: "));
    note.appendChild(link);
    note.appendChild(document.createTextNode(online ? " connected." : " disconnected."));
    note.hidden = false;
  }

  function setOnline(stationId, online) {
    var rows = rowsOf(stationId);
    if (!rows.length) { notice(stationId, online); }
    rows.forEach(function (row) {
      each(".badge", row, function (badge) {
        badge.setAttribute("data-online", online ? "true" : "false");
        badge.textContent = online ? "online" : "offline";
      });
    });
  }

  function setConnector(data) {
    rowsOf(data.station_id).forEach(function (row) {
      var found = false;
      each("[data-connector]", row, function (el) {
        if (el.getAttribute("data-connector") !== String(data.connector_id)) { return; }
        found = true;
        el.setAttribute("data-status", data.status);
        each(".status", el, function (s) { s.textContent = data.status; });
        each(".error-code", el, function (s) { s.textContent = data.error_code === "NoError" ? "" : data.error_code; });
        each(".info", el, function (s) { s.textContent = data.info || ""; });
        each(".since", el, function (s) { s.textContent = (data.timestamp || "").replace("T", " ").slice(0, 19); });
        el.classList.add("changed");
      });
      var cell = row.querySelector("td.connectors");
      if (!found && cell) {
        var item = document.createElement("span");
        item.className = "connector changed";
        item.setAttribute("data-connector", String(data.connector_id));
        item.setAttribute("data-status", data.status);
        item.appendChild(document.createTextNode(data.connector_id + ": "));
        var status = document.createElement("span");
        status.className = "status";
        status.textContent = data.status;
        item.appendChild(status);
        var code = document.createElement("span");
        code.className = "error-code";
        code.textContent = data.error_code === "NoError" ? "" : " " + data.error_code;
        item.appendChild(code);
        cell.appendChild(item);
      }
      var table = row.querySelector("#connectors");
      if (!found && table) {
        var tr = document.createElement("tr");
        tr.className = "connector changed";
        tr.setAttribute("data-connector", String(data.connector_id));
        tr.setAttribute("data-status", data.status);
        [["th", String(data.connector_id)], ["td", data.status, "status"],
         ["td", data.error_code === "NoError" ? "" : data.error_code, "error-code"],
         ["td", data.info || "", "info"], ["td", (data.timestamp || "").replace("T", " ").slice(0, 19), "since"]]
          .forEach(function (cell) {
            var c = document.createElement(cell[0]);
            c.textContent = cell[1];
            if (cell[2]) { c.className = cell[2]; }
            tr.appendChild(c);
          });
        table.appendChild(tr);
      }
    });
  }

  // -- charts ----------------------------------------------------------------------------------------

  var series = null;

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function niceMax(value) {
    if (value <= 0) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= value) { return steps[i] * p; } }
    return 10 * p;
  }

  // UTC, as every time on these pages; with the day when the chart spans more than a few hours.
  function timeLabel(ms, span) {
    var iso = new Date(ms).toISOString();
    return span > 6 * 3600000 ? iso.slice(5, 16).replace("T", " ") : iso.slice(11, 19);
  }

  // Draws points [[iso time, value], ...] as a line (or, with step, a step chart) into figure.
  function drawChart(figure, points, unit, step) {
    var width = 640, height = 240, left = 64, right = 12, top = 12, bottom = 36;
    figure.textContent = "";
    figure.setAttribute("data-points", String(points.length));
    if (!points.length) {
      var empty = document.createElement("p");
      empty.textContent = "No readings yet.";
      figure.appendChild(empty);
      return;
    }
    var xs = points.map(function (p) { return Date.parse(p[0]); });
    var ys = points.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) { x1 = x0 + 60000; }
    var yMin = Math.min(0, Math.min.apply(null, ys)), yMax = niceMax(Math.max.apply(null, ys));
    function sx(x) { return left + (x - x0) / (x1 - x0) * (width - left - right); }
    function sy(y) { return top + (1 - (y - yMin) / (yMax - yMin || 1)) * (height - top - bottom); }
    var svg = el("svg", {viewBox: "0 0 " + width + " " + height, class: "chart-svg", "aria-hidden": "true"});
    for (var i = 0; i <= 4; i++) {
      var v = yMin + (yMax - yMin) * i / 4;
      svg.appendChild(el("line", {x1: left, x2: width - right, y1: sy(v), y2: sy(v), class: "grid"}));
      svg.appendChild(el("text", {x: left - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick"},
                         Math.round(v) + " " + unit));
    }
    svg.appendChild(el("text", {x: left, y: height - 10, class: "tick"}, timeLabel(x0, x1 - x0)));
    svg.appendChild(el("text", {x: width - right, y: height - 10, "text-anchor": "end", class: "tick"}, timeLabel(x1, x1 - x0)));
    var d = "";
    points.forEach(function (p, index) {
      var x = sx(xs[index]), y = sy(ys[index]);
      if (index === 0) { d += "M" + x + " " + y; }
      else if (step) { d += " H" + x + " V" + y; }
      else { d += " L" + x + " " + y; }
    });
    if (step) { d += " H" + (width - right); }
    svg.appendChild(el("path", {d: d, class: "series"}));
    points.forEach(function (p, index) {
      var dot = el("circle", {cx: sx(xs[index]), cy: sy(ys[index]), r: 2.5, class: "dot"});
      dot.appendChild(el("title", {}, p[0].replace("T", " ").slice(0, 19) + ": " + p[1] + " " + unit));
      svg.appendChild(dot);
    });
    figure.appendChild(svg);
    figure.setAttribute("aria-label", figure.getAttribute("aria-label").split(":")[0] + ": " + points.length +
                        " readings, last " + ys[ys.length - 1] + " " + unit);
  }

  function drawCharts() {
    each("figure.chart", document, function (figure) {
      var name = figure.getAttribute("data-series");
      if (series && series[name]) {
        drawChart(figure, series[name], figure.getAttribute("data-unit"), figure.hasAttribute("data-step"));
      }
    });
  }

  function addMeter(data) {
    var page = document.getElementById("transaction");
    if (!page || !series || page.getAttribute("data-transaction") !== String(data.transaction_id)) { return; }
    ["energy", "power"].forEach(function (name) {
      series[name] = (series[name] || []).concat(data[name] || []);
      series[name].sort(function (a, b) { return Date.parse(a[0]) - Date.parse(b[0]); });
    });
    var count = document.getElementById("sample-count");
    if (count) { count.textContent = String(Number(count.textContent) + (data.energy || []).length + (data.power || []).length); }
    drawCharts();
  }

  function prepend(list, tagName, cells) {
    if (!list) { return; }
    var row = document.createElement(tagName);
    row.className = "changed";
    cells(row);
    list.insertBefore(row, list.firstChild);
  }

  function cell(row, tag, text, href) {
    var c = document.createElement(tag);
    if (href) {
      var a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      c.appendChild(a);
    } else {
      c.textContent = text;
    }
    row.appendChild(c);
  }

  function onStationPage(stationId) {
    var page = document.getElementById("station-page");
    return page && page.getAttribute("data-station") === stationId;
  }

  function statusHistory(data) {
    if (!onStationPage(data.station_id)) { return; }
    prepend(document.getElementById("status-history"), "li", function (li) {
      li.textContent = (data.timestamp || "").replace("T", " ").slice(0, 19) + " · connector " + data.connector_id +
        " · " + data.status + (data.error_code && data.error_code !== "NoError" ? " · " + data.error_code : "");
    });
  }

  function transactionChanged(data) {
    each('tr[data-transaction="' + Number(data.transaction_id) + '"] .stopped', document, function (c) {
      if (!data.active) { c.textContent = (data.stopped_at || "").replace("T", " ").slice(0, 19); }
    });
    if (data.active && onStationPage(data.station_id)) {
      prepend(document.getElementById("station-transactions"), "tr", function (tr) {
        tr.setAttribute("data-transaction", String(data.transaction_id));
        cell(tr, "th", String(data.transaction_id), "/ui/transactions/" + Number(data.transaction_id));
        cell(tr, "td", String(data.connector_id));
        cell(tr, "td", "");
        cell(tr, "td", "now");
        var stopped = document.createElement("td");
        stopped.className = "stopped";
        stopped.textContent = "active";
        tr.appendChild(stopped);
      });
    }
    var page = document.getElementById("transaction");
    if (page && page.getAttribute("data-transaction") === String(data.transaction_id) && !data.active) {
      var stopped = document.getElementById("stopped");
      if (stopped) { stopped.textContent = "stopped " + (data.stopped_at || "").replace("T", " ").slice(0, 19); }
    }
  }

  // -- the event stream ------------------------------------------------------------------------------

  function live() {
    var badge = document.getElementById("live");
    if (!badge || !window.EventSource) { return; }
    // A transaction's page asks for its meter values too; no other page gets any.
    var page = document.getElementById("transaction");
    var transaction = page && page.getAttribute("data-transaction");
    var source = new EventSource("/ui/events" + (transaction ? "?transaction=" + encodeURIComponent(transaction) : ""));
    function state(name, text) { badge.setAttribute("data-state", name); badge.textContent = text; }
    // Updates can be missed: while the stream was down, or when a node of a cluster had more to relay than
    // it may send at once (a "missed" event). The page then says so, until it is reloaded.
    var missed = false;
    function current() { state(missed ? "stale" : "live", missed ? "live · reload for missed updates" : "live"); }
    source.onopen = current;
    source.onerror = function () { missed = true; state("connecting", "reconnecting…"); };
    function on(name, fn) {
      source.addEventListener(name, function (event) {
        try { fn(JSON.parse(event.data)); } catch (e) { /* a malformed event changes nothing */ }
      });
    }
    on("station", function (d) { setOnline(d.station_id, d.online); });
    on("boot", function (d) {
      rowsOf(d.station_id).forEach(function (row) {
        each("td.boot", row, function (c) { c.textContent = (d.vendor || "") + " " + (d.model || ""); });
      });
    });
    on("status", function (d) { setConnector(d); statusHistory(d); });
    on("meter", addMeter);
    on("transaction", transactionChanged);
    on("missed", function () { missed = true; current(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var data = document.getElementById("series");
    if (data) {
      try { series = JSON.parse(data.textContent); } catch (e) { series = {energy: [], power: []}; }
      drawCharts();
    }
    live();
  });
}());

// The firmware upload: the API takes the file as the raw request body, so the script sends it that way.
document.addEventListener("DOMContentLoaded", function () {
  "use strict";
  var form = document.getElementById("firmware-upload");
  if (!form) { return; }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = document.getElementById("firmware-upload-file").files[0];
    var name = document.getElementById("firmware-upload-name").value || (file && file.name) || "";
    var state = document.getElementById("firmware-upload-state");
    var token = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
    if (!file) { return; }
    state.textContent = "uploading…";
    fetch("/ui/firmware-files?name=" + encodeURIComponent(name), {
      method: "POST", body: file, credentials: "same-origin",
      headers: {"X-CSRF-Token": token, "Content-Type": "application/octet-stream"}
    }).then(function () { window.location.reload(); },
            function () { state.textContent = "upload failed"; });
  });
});
