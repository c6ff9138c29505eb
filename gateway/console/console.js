// The Garage console's script: served by the gateway at /console/assets/console.js. Every page
// works without it; with it the overview refreshes itself and the playground streams. It writes
// what it receives with textContent only: nothing from a server or a model becomes markup.
"use strict";

(function () {
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  // ---- overview: cumulative counters every two seconds, turned into rates here ----
  const live = document.querySelector("[data-live]");
  if (live) {
    const url = live.getAttribute("data-live");
    let last = null;
    const ms = (v) => (v === null || v === undefined ? "–" : (isFinite(v) ? Math.round(v) + " ms" : "> 300 s"));
    async function tick() {
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } });
        if (!response.ok) return;
        const now = { at: performance.now(), data: await response.json() };
        if (last) {
          const secs = (now.at - last.at) / 1000;
          const rate = (key) => ((now.data[key] - last.data[key]) / secs);
          const rates = {
            requests: rate("requests"),
            errors: rate("errors"),
            tokens: rate("prompt_tokens") + rate("completion_tokens"),
          };
          for (const el of live.querySelectorAll("[data-rate]")) {
            const v = rates[el.getAttribute("data-rate")];
            el.textContent = v === undefined ? "–" : v.toFixed(1);
          }
        }
        for (const el of live.querySelectorAll("[data-field]")) {
          const key = el.getAttribute("data-field");
          const v = now.data[key];
          el.textContent = key.endsWith("_ms") ? ms(v) : String(v);
        }
        last = now;
      } catch (_) {
        // The next tick tries again.
      }
    }
    tick();
    setInterval(tick, 2000);
  }

  // ---- playground: a streamed chat answer, token by token ----
  const form = document.getElementById("playground");
  if (form) {
    const answer = document.getElementById("pg-answer");
    const status = document.getElementById("pg-status");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      answer.textContent = "";
      status.textContent = "…";
      const key = document.getElementById("pg-key").value.trim();
      const body = {
        model: document.getElementById("pg-model").value,
        messages: [{ role: "user", content: document.getElementById("pg-prompt").value }],
        stream: true,
        stream_options: { include_usage: true },
      };
      try {
        const response = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: { "content-type": "application/json", authorization: "Bearer " + key },
          body: JSON.stringify(body),
        });
        if (!response.ok) {
          const error = await response.json().catch(() => null);
          status.textContent = "Error " + response.status + ": " +
            (error && error.error ? error.error.message : response.statusText);
          return;
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let usage = null;
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            for (const line of event.split("\n")) {
              if (!line.startsWith("data: ")) continue;
              const data = line.slice(6);
              if (data === "[DONE]") continue;
              const chunk = JSON.parse(data);
              const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
              if (delta && delta.content) answer.textContent += delta.content;
              if (chunk.usage) usage = chunk.usage;
            }
          }
        }
        status.textContent = usage
          ? "Done: " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens."
          : "Done.";
      } catch (err) {
        status.textContent = "The request failed: " + err;
      }
    });
  }

  // Forms posted by fetch elsewhere would send the CSRF token in this header.
  window.garageCsrf = csrfToken;
})();
