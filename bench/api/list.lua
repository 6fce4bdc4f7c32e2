-- bench/api.sh: GET /api/catalog/products?page=&per_page= (in the URL) as a
-- browser sends it: no cookie needed.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "browser.lua")
function init(args) browser("navigate") end
