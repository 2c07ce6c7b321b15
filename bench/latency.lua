-- wrk's latency percentiles, finer than --latency gives, for bench.py's latency mode (bench/run.sh
-- --plot): done() prints one "PCT <percentile> <microseconds>" line each, and the maximum as 100.
-- wrk (not wrk2) sends each request when the previous response is in: no coordinated-omission
-- correction, so the tail is the tail of a closed loop.
local percentiles = {1, 5, 10, 25, 50, 75, 90, 95, 97.5, 99, 99.5, 99.75, 99.9, 99.95, 99.99, 99.999}

done = function(summary, latency, requests)
   for _, p in ipairs(percentiles) do
      io.write(string.format("PCT %g %d\n", p, latency:percentile(p)))
   end
   io.write(string.format("PCT 100 %d\n", latency.max))
end
