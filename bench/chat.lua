-- wrk script: non-streamed chat completion. See lib.lua.
bench_stream = false
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "lib.lua")
