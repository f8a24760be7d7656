// backgrounder dashboard: live progress over server-sent events, cancel and retry.
// Every value from a job goes into the page through textContent or an
// attribute, never as HTML, so params and messages cannot inject markup.
(function () {
  "use strict";

  var API = document.body.getAttribute("data-api");
  var STAGES = ["fetch", "preprocess", "infer", "postprocess", "write", "cleanup"];
  var TERMINAL = { done: true, failed: true, canceled: true };
  // Browsers open about six connections per host over HTTP/1.1; keep two free
  // for page loads and button calls, and poll the jobs beyond that.
  var MAX_STREAMS = 4;
  var POLL_MS = 2000;
  var streams = {};

  function jobUrl(id, tail) {
    return API + "/" + encodeURIComponent(id) + (tail || "");
  }

  function flash(text, ok) {
    var box = document.getElementById("flash");
    box.textContent = text;
    box.className = ok ? "flash ok" : "flash";
    box.hidden = false;
  }

  function setText(root, selector, text) {
    var node = root.querySelector(selector);
    if (node) node.textContent = text;
  }

  function describeProgress(progress) {
    var parts = [];
    if (progress.total > 0) parts.push(progress.processed + "/" + progress.total);
    else if (progress.processed > 0) parts.push(String(progress.processed));
    parts.push(Math.round(progress.percent) + "%");
    return parts.join(" · ");
  }

  function apply(el, job) {
    var before = el.getAttribute("data-status");
    el.setAttribute("data-status", job.status);
    el.setAttribute("data-cancel-requested", job.cancel_requested ? "true" : "false");
    setText(el, ".status", job.status);
    var progress = job.progress || {};
    var bar = el.querySelector("progress");
    if (bar) {
      var percent = Math.round(progress.percent || 0);
      bar.setAttribute("value", String(percent));
      bar.textContent = percent + "%";
    }
    var index = STAGES.indexOf(progress.stage);
    el.querySelectorAll(".stages li").forEach(function (li, i) {
      li.className = i < index ? "past" : i === index ? "current" : "";
    });
    setText(el, ".stage-name", progress.stage || "idle");
    setText(el, ".progress-numbers", describeProgress(progress));
    setText(el, ".message", progress.message || "");
    el.querySelectorAll("[data-field]").forEach(function (node) {
      var value = job[node.getAttribute("data-field")];
      node.textContent = value === null || value === undefined ? "—" : String(value);
    });
    // A detail page shows error, assets and history rendered by the server:
    // reload it when the job moves to another status or attempt.
    if (el.hasAttribute("data-reload") && before !== job.status) {
      window.location.reload();
    }
  }

  function isActive(el) {
    return !TERMINAL[el.getAttribute("data-status")];
  }

  function stopStream(id) {
    if (streams[id]) {
      streams[id].close();
      delete streams[id];
    }
  }

  function openStream(el) {
    var id = el.getAttribute("data-job-id");
    var source = new EventSource(jobUrl(id, "/events"));
    streams[id] = source;
    function onEvent(message) {
      var job = JSON.parse(message.data);
      apply(el, job);
      // The server ends the stream at a final status; close it before the
      // browser would reconnect, and give the slot to another job.
      if (TERMINAL[job.status]) {
        stopStream(id);
        watchAll();
      }
    }
    source.addEventListener("status", onEvent);
    source.addEventListener("progress", onEvent);
    source.onerror = function () {
      stopStream(id);
      refresh(el);
    };
  }

  function refresh(el) {
    return fetch(jobUrl(el.getAttribute("data-job-id")), {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (job) { if (job) apply(el, job); })
      .catch(function () { /* the next poll tries again */ });
  }

  function watchAll() {
    document.querySelectorAll("[data-job-id]").forEach(function (el) {
      var id = el.getAttribute("data-job-id");
      if (!isActive(el) || streams[id]) return;
      if (Object.keys(streams).length < MAX_STREAMS) openStream(el);
    });
  }

  function pollRest() {
    var waiting = [];
    document.querySelectorAll("[data-job-id]").forEach(function (el) {
      if (isActive(el) && !streams[el.getAttribute("data-job-id")]) waiting.push(el);
    });
    var chain = Promise.resolve();
    waiting.forEach(function (el) {
      chain = chain.then(function () { return refresh(el); });
    });
    chain.then(function () {
      watchAll();
      window.setTimeout(pollRest, POLL_MS);
    });
  }

  function act(button) {
    var el = button.closest("[data-job-id]");
    var action = button.getAttribute("data-action");
    var id = el.getAttribute("data-job-id");
    button.disabled = true;
    fetch(jobUrl(id, "/" + action), {
      method: "POST",
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    })
      .then(function (response) {
        return response.json().then(
          function (body) { return { ok: response.ok, status: response.status, body: body }; },
          function () { return { ok: response.ok, status: response.status, body: {} }; }
        );
      })
      .then(function (answer) {
        if (!answer.ok) {
          var detail = answer.body && answer.body.detail;
          flash(action + " failed (HTTP " + answer.status + "): " +
            (typeof detail === "string" ? detail : JSON.stringify(detail)));
          return;
        }
        flash((action === "cancel" ? "Cancel requested for job " : "Queued again: job ") +
          id, true);
        stopStream(id);
        apply(el, answer.body);
        watchAll();
      })
      .catch(function (error) { flash(action + " failed: " + error); })
      .then(function () { button.disabled = false; });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (button) {
      event.preventDefault();
      act(button);
    }
  });

  watchAll();
  window.setTimeout(pollRest, POLL_MS);
})();
