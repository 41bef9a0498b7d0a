// htmx 2 writes the current path (which names the patient) to sessionStorage as it loads and on
// every history push, whatever its history settings. Nothing of a patient may stay in the browser
// (docs/ui.md), so the key is removed as soon as it is written: after htmx has loaded, and after each
// of its history events. Loaded right after htmx, deferred like it.
(function () {
  "use strict";
  var KEY = "htmx-current-path-for-history";
  function forget() {
    try {
      window.sessionStorage.removeItem(KEY);
    } catch (e) {
      // no sessionStorage (private mode, disabled): nothing was stored
    }
  }
  forget();
  ["htmx:pushedIntoHistory", "htmx:replacedInHistory", "htmx:afterSettle", "htmx:historyRestore"].forEach(
    function (name) {
      document.addEventListener(name, forget);
    }
  );
  window.addEventListener("pagehide", forget);
})();
