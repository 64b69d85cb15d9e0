-- wrk `done` hook: print the run's numbers as one JSON line prefixed with
-- "WRK_JSON ", so bench/run.sh does not have to parse wrk's human output.
-- Latencies are in microseconds, duration too (that is what wrk gives).

-- With POST=N in the environment (bench/run.sh POST=N), every request is a POST with an
-- N-byte body.
local post = tonumber(os.getenv("POST") or "0") or 0
if post > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", post)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

done = function(summary, latency, requests)
  local e = summary.errors
  local function int(x) return math.floor(x + 0.5) end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"lat_mean_us":%d,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    int(latency.mean), int(latency:percentile(50)), int(latency:percentile(90)),
    int(latency:percentile(99)), int(latency.max),
    e.connect, e.read, e.write, e.status, e.timeout))
end
