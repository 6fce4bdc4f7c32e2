-- bench/api.sh: GET /api/accounts/me with the session cookie, as the
-- page's script fetches it.  wrk ... -s bench/api/me.lua URL -- TOKEN
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "browser.lua")
function init(args) browser("fetch", args[1]) end
