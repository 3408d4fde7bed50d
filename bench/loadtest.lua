-- wrk script for the callback load test (bench/src/bin/loadtest.rs writes the request file).
-- Each line of $REQS is one pre-generated, signed, encrypted callback:
--   target \t header: value (0x1f-separated) \t body
-- Thread k of $THREADS takes lines k, k+THREADS, ..., so no two threads ever send the same
-- event; a thread that runs out starts over (the load test reports that as "wrapped").

local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local reqs = {}
local i = 0

function init(args)
  local n = tonumber(os.getenv("THREADS") or "1")
  local me = tid or 0
  local k = 0
  for line in io.lines(os.getenv("REQS")) do
    if k % n == me then
      local target, hdrs, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      local headers = {}
      for h in hdrs:gmatch("[^\31]+") do
        local name, value = h:match("^([^:]+): ?(.*)$")
        headers[name] = value
      end
      reqs[#reqs + 1] = wrk.format("POST", target, headers, body)
    end
    k = k + 1
  end
end

function request()
  i = i + 1
  if i > #reqs then
    i = 1
  end
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f,"stdev_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, latency.stdev))
end
