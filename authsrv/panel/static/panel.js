// Live refresh for pages that ask for it: an element with data-refresh="URL" is replaced every
// few seconds by the HTML fragment at URL. The pages work without it (a reload shows the same).
"use strict";
(function () {
  function refresh(element) {
    const url = element.getAttribute("data-refresh");
    const every = Math.max(2000, parseInt(element.getAttribute("data-every") || "3000", 10));
    async function tick() {
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { "accept": "text/html" } });
        // A session that ended answers with a redirect to the login page (followed by fetch, 200):
        // check that first, or the login form would be pasted into the page.
        if (response.redirected || response.status === 401) {
          window.location.assign("/panel/login");
          return;
        }
        if (response.ok) {
          element.innerHTML = await response.text();
          element.setAttribute("data-updated", new Date().toISOString());
        }
      } catch (error) { /* the server may be restarting: try again next tick */ }
      window.setTimeout(tick, every);
    }
    window.setTimeout(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
  });
})();
