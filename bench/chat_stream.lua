-- wrk script: streamed chat completion (`"stream": true`, server-sent events). See lib.lua.
bench_stream = true
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "lib.lua")
