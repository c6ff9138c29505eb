-- Shared by chat.lua and chat_stream.lua: one POST /v1/chat/completions per request, and a
-- machine-readable summary line when the run ends.
--
-- Environment (read once per wrk thread):
--   BENCH_KEY    API key sent as `Authorization: Bearer ...` (the engine ignores it; it is sent
--                direct too so both modes carry the same request).
--   BENCH_MODEL  model name (default sim-llama-3-8b).
-- The wrapper script (chat.lua or chat_stream.lua) sets the global `bench_stream`.

local key = os.getenv("BENCH_KEY") or "none"
local model = os.getenv("BENCH_MODEL") or "sim-llama-3-8b"
local stream = bench_stream and "true" or "false"

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are terse."},'
  .. '{"role":"user","content":"Say hello to the garage."}],"stream":' .. stream .. '}'

-- No `request()` hook: without one wrk builds the request once from wrk.method/path/headers/body
-- and sends those bytes every time, with no Lua call per request.

-- One line, `key=value` pairs, latencies in microseconds. The shell harness greps for it.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d rps=%.2f p50_us=%d p90_us=%d p99_us=%d "
      .. "max_us=%d mean_us=%.1f err_connect=%d err_read=%d err_write=%d err_status=%d "
      .. "err_timeout=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
