/*
 * Keeps a report page from navigating to Moodle's login page, for
 * moodle-archive-worker (installed as an init script, so it runs before any
 * of the page's own scripts).
 *
 * Moodle sends an anonymous browser to /login/index.php when an AJAX call
 * needs a session.  Aborting that navigation in the network layer is not
 * enough: Chromium then commits its "blocked" error page, and a redirect
 * issued while the page is still being parsed stops the parser.  The
 * Navigation API lets us cancel the navigation before it starts, so the
 * report stays as it is.  The worker's request routing remains as a second
 * line of defence for navigations that cannot be cancelled.
 */
(() => {
  if (!window.navigation) {
    return;
  }
  const LOGIN_PATH = /\/login\/[^/]*\.php$/;
  // Taken now: a page may well assign its own global URL later.
  const NativeURL = window.URL;
  window.navigation.addEventListener("navigate", (event) => {
    let target;
    try {
      target = new NativeURL(event.destination.url);
    } catch (error) {
      return;
    }
    if (LOGIN_PATH.test(target.pathname) && event.cancelable) {
      event.preventDefault();
      console.warn(`x-moodle-archiver-login-redirect-blocked ${target.origin}${target.pathname}`);
    }
  });
})();
