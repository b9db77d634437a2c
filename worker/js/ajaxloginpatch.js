/*
 * Replacement for Moodle's AJAX login redirect, for moodle-archive-worker.
 *
 * worker/routing.py puts this expression where a script served to a report
 * page says window.location = URL.relativeUrl("/login/index.php") (core/ajax,
 * when a web service call needs a session).  Instead of leaving the page it
 * logs a warning and rejects the promises of the failed call, so code
 * waiting on them carries on with its error path.  In core/ajax the failed
 * requests are `requests` (unminified) and `this` (the jQuery context, kept
 * by the arrow function); minified builds rename locals, hence the fallbacks.
 *
 * The file is collapsed to one line before use (the match may sit inside a
 * single-line construct), so: no line comments and explicit semicolons below.
 * `void` keeps a preceding line without a semicolon from calling it.
 */
void (() => {
  console.warn("x-moodle-archiver-ajax-login-redirect-blocked");
  let failure = { errorcode: "servicerequireslogin", message: "Moodle session required" };
  let pending = Array.isArray(this) ? this : [];
  try {
    if (typeof exception !== "undefined" && exception) {
      failure = exception;
    }
    if (typeof requests !== "undefined" && Array.isArray(requests)) {
      pending = requests;
    }
  } catch (error) {
    failure.detail = String(error);
  }
  for (const request of pending) {
    if (request && request.deferred && typeof request.deferred.reject === "function") {
      request.deferred.reject(failure);
    }
  }
})()
