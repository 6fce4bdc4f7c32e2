-- Shared by bench/api.sh's wrk scripts (loaded with dofile): the headers
-- Chrome 131 on Linux sends, and a `done` that prints one JSON line
-- (WRKJSON {...}: req/s, latency percentiles in µs, errors) for the
-- script to read. `browser(kind, cookie)`: kind "navigate" (a GET the
-- browser makes for a page or a typed URL) or "fetch" (a same-origin
-- fetch() from the page's script: Accept */*, Origin, Sec-Fetch-* cors).
function browser(kind, cookie)
  local h = wrk.headers
  h["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
  h["Accept-Encoding"] = "gzip, deflate, br"
  h["Accept-Language"] = "en-US,en;q=0.9"
  h["sec-ch-ua"] = '"Google Chrome";v="131", "Chromium";v="131", "Not_A Brand";v="24"'
  h["sec-ch-ua-mobile"] = "?0"
  h["sec-ch-ua-platform"] = '"Linux"'
  if kind == "fetch" then
    h["Accept"] = "*/*"
    h["Origin"] = "http://" .. wrk.host .. ":" .. wrk.port
    h["Sec-Fetch-Site"] = "same-origin"
    h["Sec-Fetch-Mode"] = "cors"
    h["Sec-Fetch-Dest"] = "empty"
  else
    h["Accept"] = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
    h["Sec-Fetch-Site"] = "none"
    h["Sec-Fetch-Mode"] = "navigate"
    h["Sec-Fetch-Dest"] = "document"
    h["Upgrade-Insecure-Requests"] = "1"
  end
  if cookie and cookie ~= "" and cookie ~= "-" then
    h["Cookie"] = "shoal_session=" .. cookie
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"seconds":%.3f,"rps":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"non_2xx_3xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end
