// Live audience counts: apply the membership events of /audiences/live to the table.
(function () {
  "use strict";
  function start() {
    var table = document.getElementById("segments");
    if (!table || !window.EventSource) return;
    var source = new EventSource(table.getAttribute("data-live"));
    source.addEventListener("membership", function (e) {
      var change = JSON.parse(e.data);
      var rows = table.querySelectorAll("tr[data-segment]");
      for (var i = 0; i < rows.length; i++) {
        if (rows[i].getAttribute("data-segment") !== change.segment) continue;
        var members = rows[i].querySelector(".members");
        members.textContent = String(Math.max(0, parseInt(members.textContent, 10) + change.delta));
        rows[i].querySelector(".live-entered").textContent = String(change.entered);
        rows[i].querySelector(".live-exited").textContent = String(change.exited);
      }
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
