/* Dashboard charts: Chart.js (vendored under static/vendor/chartjs), data from json_script tags.
   Every chart says what it measures: axis titles, legends and tooltips carry amounts and units. */
(function () {
  "use strict";
  if (typeof Chart === "undefined") { return; }
  function read(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }
  var palette = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#4b5563"];
  // USD with the precision that matters: cents from $1 up, two significant digits below.
  function usd(v) {
    v = Number(v) || 0;
    var a = Math.abs(v), places = 2;
    if (a > 0 && a < 1) { places = Math.min(8, Math.max(2, 1 - Math.floor(Math.log10(a)))); }
    return (v < 0 ? "-$" : "$") + a.toLocaleString("en-US", {minimumFractionDigits: places, maximumFractionDigits: places});
  }
  function share(v, total) { return total > 0 ? (100 * v / total).toFixed(v / total < 0.1 ? 1 : 0) + "%" : "–"; }
  function clip(text, n) { text = String(text); return text.length > n ? text.slice(0, n - 1) + "…" : text; }

  var series = read("series-data");
  // The series leaves empty buckets out; the chart shows every hour or day of the filtered range,
  // so one day of spend in a week reads as one bar of seven, not as a bar as wide as the week.
  function withEmptyBuckets(rows, hourly) {
    var since = document.getElementById("id_since"), until = document.getElementById("id_until");
    if (!since || !until || !since.value || !until.value) { return rows; }
    var width = hourly ? 13 : 10, step = hourly ? 3600e3 : 86400e3, byBucket = {}, out = [];
    rows.forEach(function (r) { byBucket[r.bucket.slice(0, width)] = r; });
    var t = Date.parse(since.value + "T00:00:00Z"), end = Date.parse(until.value + "T00:00:00Z") + 86400e3;
    for (; t < end && out.length <= 2000; t += step) {
      var iso = new Date(t).toISOString();
      out.push(byBucket[iso.slice(0, width)] || {bucket: iso, cost: "0", requests: 0});
    }
    return out.length > 2000 ? rows : out;
  }
  var breakdowns = read("breakdown-data");
  if (series && document.getElementById("chart-series")) {
    var granularity = document.getElementById("chart-series").dataset.granularity;
    var hourly = granularity ? granularity === "hour"
      : series.length && series.some(function (r) { return r.bucket.slice(11, 16) !== "00:00"; });
    series = withEmptyBuckets(series, hourly);
    new Chart(document.getElementById("chart-series"), {
      type: "bar",
      data: {
        labels: series.map(function (r) { return hourly ? r.bucket.slice(5, 16).replace("T", " ") : r.bucket.slice(0, 10); }),
        datasets: [
          // order: the lower is drawn last, on top: the requests line stays visible over the bars.
          {label: "Spend (USD)", data: series.map(function (r) { return parseFloat(r.cost); }), backgroundColor: palette[0],
           yAxisID: "y", order: 2},
          {label: "Requests", type: "line", data: series.map(function (r) { return r.requests; }), borderColor: palette[2],
           backgroundColor: palette[2], pointRadius: 2, borderWidth: 2, yAxisID: "y1", order: 1}
        ]
      },
      options: {animation: false, responsive: true, maintainAspectRatio: false, interaction: {mode: "index", intersect: false},
        plugins: {tooltip: {callbacks: {label: function (ctx) {
          return ctx.dataset.yAxisID === "y" ? "Spend: " + usd(ctx.parsed.y) : "Requests: " + ctx.parsed.y;
        }}}},
        scales: {y: {beginAtZero: true, title: {display: true, text: "Spend (USD)"}, ticks: {callback: function (v) { return usd(v); }}},
                 y1: {beginAtZero: true, position: "right", title: {display: true, text: "Requests"},
                      ticks: {precision: 0}, grid: {drawOnChartArea: false}}}}
    });
  }
  if (breakdowns) {
    ["model", "source", "key", "budget_id"].forEach(function (by) {
      var all = breakdowns[by] || [], rows = all.slice(0, 7);
      if (all.length > 7) {  // the rest as one slice, so the shares add up to the total
        var rest = all.slice(7).reduce(function (s, r) { return s + parseFloat(r.cost); }, 0);
        rows.push({label: "other (" + (all.length - 7) + ")", cost: String(rest)});
      }
      var canvas = document.getElementById("chart-" + by);
      if (!canvas) { return; }
      var values = rows.map(function (r) { return parseFloat(r.cost); });
      var total = values.reduce(function (s, v) { return s + v; }, 0);
      new Chart(canvas, {
        type: "doughnut",
        data: {labels: rows.map(function (r) { return r.label; }),
               datasets: [{label: "Spend (USD)", data: values, backgroundColor: palette}]},
        options: {animation: false, responsive: true, maintainAspectRatio: false,
          plugins: {
            legend: {position: "bottom", labels: {boxWidth: 12, generateLabels: function (chart) {
              return Chart.overrides.doughnut.plugins.legend.labels.generateLabels(chart).map(function (item, i) {
                item.text = clip(chart.data.labels[i], 24) + "  " + usd(values[i]) + " (" + share(values[i], total) + ")";
                return item;
              });
            }}},
            tooltip: {callbacks: {label: function (ctx) {
              return " " + ctx.label + ": " + usd(ctx.parsed) + " (" + share(ctx.parsed, total) + " of " + usd(total) + ")";
            }}}
          }}
      });
    });
  }
  var burndown = read("burndown-data");
  if (burndown && document.getElementById("chart-burndown")) {
    var limit = parseFloat(burndown.limit);
    new Chart(document.getElementById("chart-burndown"), {
      type: "line",
      data: {labels: burndown.labels, datasets: [
        {label: "Spent (cumulative)", data: burndown.spent.map(parseFloat), borderColor: palette[0], backgroundColor: palette[0],
         pointRadius: 1, borderWidth: 2},
        {label: "Forecast (average pace)", data: burndown.forecast.map(function (v) { return v === null ? null : parseFloat(v); }),
         borderColor: palette[2], backgroundColor: palette[2], borderDash: [6, 4], pointRadius: 0, borderWidth: 2},
        {label: "Limit " + usd(limit), data: burndown.labels.map(function () { return limit; }), borderColor: palette[4],
         backgroundColor: palette[4], pointRadius: 0, borderWidth: 1}
      ]},
      options: {animation: false, responsive: true, maintainAspectRatio: false, interaction: {mode: "index", intersect: false},
        plugins: {legend: {position: "bottom"}, tooltip: {callbacks: {label: function (ctx) {
          return ctx.parsed.y === null ? null : ctx.dataset.label.split(" $")[0] + ": " + usd(ctx.parsed.y);
        }}}},
        scales: {y: {beginAtZero: true, title: {display: true, text: "USD"}, ticks: {callback: function (v) { return usd(v); }}},
                 x: {ticks: {maxTicksLimit: 16}}}}
    });
  }
}());
