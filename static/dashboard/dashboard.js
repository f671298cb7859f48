/* Dashboard charts: Chart.js (vendored under static/vendor/chartjs), data from json_script tags. */
(function () {
  "use strict";
  if (typeof Chart === "undefined") { return; }
  function read(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }
  var palette = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#4b5563"];
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
  if (series) {
    var granularity = document.getElementById("chart-series").dataset.granularity;
    var hourly = granularity ? granularity === "hour"
      : series.length && series.some(function (r) { return r.bucket.slice(11, 16) !== "00:00"; });
    series = withEmptyBuckets(series, hourly);
    new Chart(document.getElementById("chart-series"), {
      type: "bar",
      data: {
        labels: series.map(function (r) { return hourly ? r.bucket.slice(5, 16).replace("T", " ") : r.bucket.slice(0, 10); }),
        datasets: [
          {label: "Spend (USD)", data: series.map(function (r) { return parseFloat(r.cost); }), backgroundColor: palette[0], yAxisID: "y"},
          {label: "Requests", type: "line", data: series.map(function (r) { return r.requests; }), borderColor: palette[2], yAxisID: "y1"}
        ]
      },
      options: {animation: false, responsive: true, maintainAspectRatio: false,
        scales: {y: {beginAtZero: true, title: {display: true, text: "USD"}},
                 y1: {beginAtZero: true, position: "right", grid: {drawOnChartArea: false}}}}
    });
  }
  if (breakdowns) {
    ["model", "source", "key", "budget_id"].forEach(function (by) {
      var rows = (breakdowns[by] || []).slice(0, 8);
      var canvas = document.getElementById("chart-" + by);
      if (!canvas) { return; }
      new Chart(canvas, {
        type: "doughnut",
        data: {labels: rows.map(function (r) { return r.label; }),
               datasets: [{data: rows.map(function (r) { return parseFloat(r.cost); }), backgroundColor: palette}]},
        options: {animation: false, responsive: true, maintainAspectRatio: false, plugins: {legend: {position: "right"}}}
      });
    });
  }
}());
