/*
 * Ready signal of a Moodle report page (contract 3.5), for moodle-archive-worker.
 *
 * worker/render.py evaluates this file with page.evaluate() once the page's
 * load event has fired.  The file is a single arrow function; it returns a
 * Promise that settles when every component found on the page is ready, or
 * when options.timeoutMs has passed, with
 *
 *     {ready: true|false, components: {name: null|false|true}}
 *
 * where null means "not on this page", false "still pending", true "ready".
 * Unlike the reference worker there is no fixed start delay: every check
 * runs at once and only waits for something that is actually pending.
 * Progress goes to the console with the x-moodle-archiver- prefix (logged by
 * the worker at DEBUG); the worker itself only uses the returned value.
 */
(options) => {
  const PREFIX = "x-moodle-archiver-";
  const pollMs = options.pollMs;
  const state = (window.MoodleArchiver = window.MoodleArchiver || {});
  state.initialized = true;
  state.readySignals = {};

  const signal = (suffix) => console.log(PREFIX + suffix);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const pollUntil = async (check) => {
    while (!check()) {
      await sleep(pollMs);
    }
  };

  // Every <img>, including ones inserted after the load event.  Lazy images
  // below the fold would never load in a headless tab, so make them eager.
  const images = () => {
    const all = Array.from(document.images);
    if (all.length === 0) {
      return null;
    }
    for (const img of all) {
      if (img.loading === "lazy") {
        img.loading = "eager";
      }
    }
    const pending = all
      .filter((img) => !img.complete)
      .map(
        (img) =>
          new Promise((resolve) => {
            img.addEventListener("load", resolve, { once: true });
            img.addEventListener("error", resolve, { once: true });
          }),
      );
    if (pending.length > 0) {
      signal(`images-loading ${pending.length}`);
    }
    return Promise.all(pending);
  };

  const fonts = () => (document.fonts ? document.fonts.ready : null);

  // MathJax 2 typesets through Hub.Queue, so a callback queued now runs after
  // the pending typesetting; 3 and 4 expose startup.promise.  A MathJax
  // object without a usable version (not yet loaded, or a config object) is
  // polled for a bounded time, then taken as ready.
  const mathJaxSettled = async () => {
    const started = Date.now();
    for (;;) {
      const mj = window.MathJax;
      const version = String((mj && mj.version) || "");
      if (version.startsWith("2.") && mj.Hub && typeof mj.Hub.Queue === "function") {
        mj.Hub.processSectionDelay = 0;
        return new Promise((resolve) => mj.Hub.Queue(() => resolve()));
      }
      if (/^[34]\./.test(version) && mj.startup && mj.startup.promise) {
        return mj.startup.promise;
      }
      if (Date.now() - started >= options.unknownMathJaxMs) {
        signal("mathjax-unknown-version");
        return undefined;
      }
      await sleep(pollMs);
    }
  };

  const mathjax = () => {
    if (typeof window.MathJax === "undefined") {
      signal("mathjax-not-found");
      return null;
    }
    signal("mathjax-found");
    if (!document.querySelector(".filter_mathjaxloader_equation")) {
      signal("mathjax-no-formulas-on-page");
      return Promise.resolve();
    }
    return mathJaxSettled().then(() => signal("mathjax-ready-for-export"));
  };

  // Resolves once none of the nodes changed for quietMs.
  const quiet = (nodes, quietMs) =>
    new Promise((resolve) => {
      let timer = null;
      const observer = new MutationObserver(() => {
        signal("geogebra-mutated");
        arm();
      });
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          observer.disconnect();
          resolve();
        }, quietMs);
      };
      for (const node of nodes) {
        observer.observe(node, { childList: true, subtree: true });
      }
      arm();
    });

  const geogebraLoaded = () => {
    try {
      if (typeof window.GGBApplet().getAppletObject !== "function") {
        return false;
      }
    } catch (e) {
      return false;
    }
    const frames = document.querySelectorAll(".GeoGebraFrame");
    return (
      frames.length > 0 &&
      Array.from(frames).every((frame) => frame.classList.contains("jsloaded"))
    );
  };

  const geogebra = () => {
    if (typeof window.GGBApplet === "undefined") {
      signal("geogebra-not-found");
      return null;
    }
    signal("geogebra-found");
    return (async () => {
      await pollUntil(geogebraLoaded);
      await quiet(document.querySelectorAll(".GeoGebraFrame"), options.geogebraQuietMs);
      signal("geogebra-ready-for-export");
    })();
  };

  // VPL questions show code in Ace editors that scroll; for print each editor
  // is grown to its full content height, with soft wrap so no line is cut.
  const vplEditors = () =>
    Array.from(document.querySelectorAll(".que.vplquestion .ace-placeholder.ace_editor"))
      .map((el) => el.env && el.env.editor)
      .filter((editor) => editor && editor.renderer && editor.renderer.lineHeight > 0);

  const fitEditors = (editors) => {
    for (const editor of editors) {
      const lines = editor.getSession().getScreenLength() + 1;
      editor.container.style.height = `${lines * editor.renderer.lineHeight}px`;
      editor.resize(true);
    }
    signal("vplquestion-editor-resized");
  };

  const vplquestion = () => {
    const expected = document.querySelectorAll(
      '.que.vplquestion textarea[data-role="code-editor"]',
    ).length;
    if (expected === 0) {
      signal("vplquestion-not-found");
      return null;
    }
    signal("vplquestion-found");
    return (async () => {
      await pollUntil(() => vplEditors().length >= expected);
      const editors = vplEditors();
      for (const editor of editors) {
        editor.getSession().setUseWrapMode(true);
      }
      // Resize now as well: whether Chromium fires the print media change
      // before it lays out the PDF is not something to rely on.
      fitEditors(editors);
      window.matchMedia("print").addEventListener("change", (event) => {
        if (event.matches) {
          fitEditors(editors);
        }
      });
      signal("vplquestion-ready-for-export");
    })();
  };

  const checks = { images, fonts, mathjax, geogebra, vplquestion };
  const waits = Object.entries(checks).map(([name, check]) => {
    let pending;
    try {
      pending = check();
    } catch (error) {
      console.warn(`${PREFIX}${name}-error ${error}`);
      pending = null;
    }
    if (pending === null) {
      state.readySignals[name] = null;
      return undefined;
    }
    state.readySignals[name] = false;
    // A component whose own loading failed (a rejected MathJax startup, say)
    // is done as far as printing goes: nothing more will happen.
    return Promise.resolve(pending)
      .catch((error) => console.warn(`${PREFIX}${name}-error ${error}`))
      .then(() => {
        state.readySignals[name] = true;
      });
  });

  const allReady = Promise.all(waits).then(() => true);
  const timedOut = sleep(options.timeoutMs).then(() => false);
  return Promise.race([allReady, timedOut]).then((ready) => {
    if (ready) {
      signal("page-ready-for-export");
    }
    return { ready, components: { ...state.readySignals } };
  });
}
