-- bench/api.sh: a request with no headers but Host (what a load balancer's
-- probe sends): /healthz without Accept-Encoding, for the middleware's
-- cost without compression.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "browser.lua")
