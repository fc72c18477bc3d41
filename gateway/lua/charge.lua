-- Charge tokens used by a response to the caller's one-minute token window.
--
-- KEYS[1]  token key: a hash, second -> tokens charged in that second
-- ARGV[1]  tokens (a positive integer)
-- ARGV[2]  optional: now in milliseconds (tests); empty means Redis server TIME
--
-- Returns the tokens now held in the window's current second.

if redis.replicate_commands then redis.replicate_commands() end

local now
if ARGV[2] and ARGV[2] ~= '' then
  now = math.floor(tonumber(ARGV[2]) * 1000)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_s = math.floor(now / 1000000)

local held = redis.call('HINCRBY', KEYS[1], now_s, ARGV[1])
-- The newest bucket leaves the window at the start of second now_s + 60; the
-- key lives exactly that long, so an idle caller's key disappears by itself.
redis.call('PEXPIRE', KEYS[1], math.ceil(((now_s + 60) * 1000000 - now) / 1000))

-- Checks prune old buckets; prune here too so a caller charged often but
-- rarely checked cannot grow the hash past one minute of seconds.
if redis.call('HLEN', KEYS[1]) > 64 then
  local oldest = now_s - 59
  local flat = redis.call('HKEYS', KEYS[1])
  local stale = {}
  for _, field in ipairs(flat) do
    if tonumber(field) < oldest then stale[#stale + 1] = field end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
end
return held
