/* Loaded first: records script errors in the DOM (data-errors on <html>) so a headless
   browser check, or a person with no console open, can see that something went wrong. */
(function () {
  "use strict";
  var errors = [];
  window.__edgeErrors = errors;
  function note(text) {
    errors.push(String(text).slice(0, 500));
    document.documentElement.setAttribute("data-errors", JSON.stringify(errors));
  }
  window.addEventListener("error", function (e) {
    note((e.message || "error") + (e.filename ? " at " + e.filename + ":" + e.lineno : ""));
  });
  window.addEventListener("unhandledrejection", function (e) {
    note("unhandled rejection: " + (e.reason && e.reason.message ? e.reason.message : e.reason));
  });
  var original = console.error;
  console.error = function () {
    note(Array.prototype.map.call(arguments, String).join(" "));
    return original.apply(console, arguments);
  };
  document.documentElement.setAttribute("data-errors", "[]");
})();
