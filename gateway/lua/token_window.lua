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

-- Adds `tokens` to the bucket of the second `now` (µs) falls in, keeps sum/lo/hi and the
-- key's lifetime right. Returns the tokens now held in that second.
local function add_tokens(key, now, tokens)
  local now_s = math.floor(now / 1000000)
  local held = redis.call('HINCRBY', key, now_s, tokens)
  redis.call('HINCRBY', key, 'sum', tokens)
  redis.call('HSETNX', key, 'lo', now_s)
  local hi = tonumber(redis.call('HGET', key, 'hi'))
  if hi == nil or now_s > hi then
    redis.call('HSET', key, 'hi', now_s)
    hi = now_s
  end
  -- The newest bucket leaves the window at the start of second hi + 60; the key
  -- lives exactly that long, so an idle caller's key disappears by itself.
  redis.call('PEXPIRE', key, math.ceil(((hi + 60) * 1000000 - now) / 1000))
  -- Checks prune old buckets; prune here too so a caller charged often but
  -- rarely checked cannot grow the hash past one minute of seconds.
  if redis.call('HLEN', key) > 64 then prune_window(key, now_s - 59) end
  return held
end
