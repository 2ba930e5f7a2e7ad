// triogate console: the little script the pages need (no inline scripts:
// the Content-Security-Policy allows only files from /ui/static).
"use strict";

function copyButtons() {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var source = document.getElementById(button.dataset.copy);
      var text = source ? source.textContent : "";
      var done = function () { button.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { selectText(source); done(); });
      } else {
        selectText(source);
        done();
      }
    });
  });
}

function selectText(node) {
  if (!node) { return; }
  var range = document.createRange();
  range.selectNodeContents(node);
  var selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  try { document.execCommand("copy"); } catch (e) { /* the text stays selected */ }
}

function confirmForms() {
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
    });
  });
}

var OUTCOME_COLOURS = {
  allowed: "#2f855a",
  rate_limited: "#d69e2e",
  quota_exceeded: "#dd6b20",
  invalid: "#c53030",
  upstream_error: "#6b46c1"
};

function usageChart() {
  var data = document.getElementById("usage-history");
  var target = document.getElementById("usage-chart");
  if (!data || !target || typeof uPlot === "undefined") { return; }
  var history = JSON.parse(data.textContent);
  var columns = [history.x].concat(history.series.map(function (s) { return s.values; }));
  var series = [{}].concat(history.series.map(function (s) {
    return { label: s.name, stroke: OUTCOME_COLOURS[s.name] || "#333", width: 2,
             points: { show: history.x.length < 50 } };
  }));
  var width = Math.max(320, Math.min(target.clientWidth || 900, 1100));
  var chart = new uPlot({ width: width, height: 260, series: series, axes: [{}, { label: "requests" }] }, columns, target);
  target.dataset.points = String(history.x.length);
  target.dataset.ready = "1";
  return chart;
}

document.addEventListener("DOMContentLoaded", function () {
  copyButtons();
  confirmForms();
  usageChart();
});
