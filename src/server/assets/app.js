// threatlake dashboard: draws the charts from the page's JSON data blocks with Apache ECharts (SVG
// renderer, tooltips drawn inside the chart as text: no HTML from intel ever reaches the DOM),
// turns a dragged date range or a clicked bar into a URL filter, and follows running jobs.
(function () {
  "use strict";
  var RENDERER = "svg";

  // Only links to this server's own pages are followed.
  function sameSite(href) {
    return typeof href === "string" && href.charAt(0) === "/" && href.charAt(1) !== "/";
  }

  function withParams(changes) {
    var url = new URL(window.location.href);
    Object.keys(changes).forEach(function (k) {
      if (changes[k] === null) { url.searchParams.delete(k); } else { url.searchParams.set(k, changes[k]); }
    });
    url.searchParams.delete("offset");
    return url.pathname + url.search;
  }

  function day(ms) {
    return new Date(ms).toISOString().slice(0, 10);
  }

  function data(el) {
    var src = document.getElementById(el.getAttribute("data-source"));
    if (!src) { return []; }
    try { return JSON.parse(src.textContent || "[]"); } catch (e) { return []; }
  }

  // Days are UTC midnights, so a dragged range names the same days in every time zone.
  function utc(dayText) {
    return Date.parse(dayText + "T00:00:00Z");
  }

  function timeChart(el, rows) {
    var chart = echarts.init(el, null, { renderer: RENDERER });
    chart.setOption({
      animation: false,
      grid: { left: 48, right: 16, top: 16, bottom: 40 },
      tooltip: { trigger: "axis", renderMode: "richText" },
      xAxis: { type: "time" },
      yAxis: { type: "value", minInterval: 1 },
      toolbox: { show: false },
      series: [{ type: "bar", name: "items", barMaxWidth: 14, itemStyle: { color: "#2f5f8a" },
        data: rows.map(function (r) { return [utc(r.day), r.items]; }) }]
    });
    // A drag across the plot selects the days under it.
    var zr = chart.getZr();
    var startX = null;
    zr.on("mousedown", function (e) { startX = e.offsetX; });
    zr.on("mouseup", function (e) {
      if (startX === null) { return; }
      var a = Math.min(startX, e.offsetX), b = Math.max(startX, e.offsetX);
      startX = null;
      if (b - a < 5) { return; }
      var from = chart.convertFromPixel({ xAxisIndex: 0 }, a);
      var to = chart.convertFromPixel({ xAxisIndex: 0 }, b);
      // The end day is included: the filter's `until` is exclusive.
      window.location.assign(withParams({ since: day(from), until: day(to + 86400000) }));
    });
    return chart;
  }

  function barChart(el, rows) {
    var chart = echarts.init(el, null, { renderer: RENDERER });
    var labels = rows.map(function (r) { return String(r.label); });
    chart.setOption({
      animation: false,
      grid: { left: 8, right: 24, top: 8, bottom: 8, containLabel: true },
      tooltip: { trigger: "item", renderMode: "richText" },
      xAxis: { type: "value", minInterval: 1 },
      yAxis: { type: "category", inverse: true, data: labels,
        axisLabel: { width: 160, overflow: "truncate" } },
      series: [{ type: "bar", name: "items", itemStyle: { color: "#e8703a" }, cursor: "pointer",
        data: rows.map(function (r) { return r.n; }) }]
    });
    chart.on("click", function (p) {
      var row = rows[p.dataIndex];
      if (row && sameSite(row.href)) { window.location.assign(row.href); }
    });
    return chart;
  }

  var charts = [];
  function drawCharts(root) {
    if (typeof echarts === "undefined") { return; }
    root.querySelectorAll(".chart[data-kind]").forEach(function (el) {
      if (el.getAttribute("data-drawn")) { return; }
      el.setAttribute("data-drawn", "1");
      var rows = data(el);
      var kind = el.getAttribute("data-kind");
      charts.push(kind === "time" ? timeChart(el, rows) : barChart(el, rows));
    });
  }

  function followJobs() {
    var list = document.getElementById("running");
    if (!list || typeof EventSource === "undefined") { return; }
    var source = new EventSource(list.getAttribute("data-events"));
    source.addEventListener("running", function (e) {
      var jobs;
      try { jobs = JSON.parse(e.data); } catch (err) { return; }
      list.textContent = "";
      if (!jobs.length) {
        var none = document.createElement("li");
        none.textContent = "Nothing is running.";
        list.appendChild(none);
      }
      jobs.forEach(function (j) {
        var li = document.createElement("li");
        var stages = (j.stages || []).map(function (s) { return s.stage + " " + s.status; }).join(", ");
        li.textContent = j.job + " " + j.run_id + " since " + j.started + (stages ? ": " + stages : ": starting");
        list.appendChild(li);
      });
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts(document);
    followJobs();
    window.addEventListener("resize", function () { charts.forEach(function (c) { c.resize(); }); });
  });
  document.addEventListener("htmx:afterSettle", function (e) { drawCharts(e.target); });
})();
