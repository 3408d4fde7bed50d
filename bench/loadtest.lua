-- wrk script for the callback load test (bench/src/bin/loadtest.rs writes the request files).
-- Thread k of $THREADS sends the requests in "$REQS.k": pre-generated, signed, encrypted
-- callbacks, already formatted for the wire, each as a decimal length, a newline and that many
-- bytes. So no two threads ever send the same event, and `init` (which wrk runs for one thread
-- after the other while the first is already sending) only reads. A thread that runs out
-- starts over (the load test reports that as "wrapped").

local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local reqs = {}
local i = 0

function init(args)
  local f = assert(io.open(os.getenv("REQS") .. "." .. (tid or 0), "rb"))
  while true do
    local len = f:read("*l")
    if not len then
      break
    end
    reqs[#reqs + 1] = f:read(tonumber(len))
  end
  f:close()
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
