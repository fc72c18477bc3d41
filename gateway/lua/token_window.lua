-- The token window hash, shared by ratelimit.lua and charge.lua (each includes
-- this file where its "-- @include token_window" line stands).
--
-- Fields: "<second>" -> tokens charged in that second (the 60 seconds of the
-- window and possibly some older ones not yet pruned), "sum" -> the tokens over
-- all those seconds, "lo" / "hi" -> the oldest / newest second present. While
-- "lo" is inside the window, "sum" is the window's total and a check reads
-- three fields; when "lo" has left it, prune_window rewrites the hash once
-- (at most once a second per caller), so a hot caller is not re-summed at
-- every request.

-- Drops the seconds before `oldest` and rewrites sum/lo/hi (deletes the key when
-- nothing is left). Returns the tokens left and their buckets {second, tokens},
-- oldest first.
local function prune_window(key, oldest)
  local flat = redis.call('HGETALL', key)
  local stale, buckets, used = {}, {}, 0
  for i = 1, #flat, 2 do
    local s = tonumber(flat[i])
    if s ~= nil then -- "sum", "lo" and "hi" are not seconds
      if s < oldest then
        stale[#stale + 1] = flat[i]
      else
        local n = tonumber(flat[i + 1])
        used = used + n
        buckets[#buckets + 1] = {s, n}
      end
    end
  end
  if #buckets == 0 then
    redis.call('DEL', key)
    return 0, buckets
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  redis.call('HSET', key, 'sum', used, 'lo', buckets[1][1], 'hi', buckets[#buckets][1])
  return used, buckets
end
