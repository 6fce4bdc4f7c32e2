-- bench/api.sh: GET /api/catalog/products/{id} (the id is in the URL) as a
-- browser navigating to it sends it: no cookie needed.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "browser.lua")
function init(args) browser("navigate") end
