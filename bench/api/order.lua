-- bench/api.sh: POST /api/orders as the page's script sends a checkout: the
-- session cookie, JSON, and a new Idempotency-Key on every request
-- (PREFIX-1, PREFIX-2, ...; PREFIX unique to the run, round and server, so
-- no request replays an earlier order). One order line of quantity 1.
--   wrk -t1 ... -s bench/api/order.lua URL -- TOKEN PRODUCT_ID PREFIX
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "browser.lua")
local n, prefix, body = 0, "k", ""
function init(args)
  browser("fetch", args[1])
  prefix = args[3] or tostring(os.time())
  body = '{"items":[{"product_id":"' .. args[2] .. '","quantity":1}],"payment_method":"pm_card_visa"}'
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  n = n + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. n
  return wrk.format(nil, nil, nil, body)
end
