-- 16 requests per write, as a pipelining client sends them (wrk's pipeline example).
local depth = 16

init = function(args)
   local r = {}
   for i = 1, depth do
      r[i] = wrk.format(nil, "/v1/healthcheck")
   end
   req = table.concat(r)
end

request = function()
   return req
end
