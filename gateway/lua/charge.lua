-- Charge tokens used by a response to the caller's one-minute token window.
--
-- KEYS[1]  token key: the token window hash (see token_window.lua)
-- ARGV[1]  tokens (a positive integer)
-- ARGV[2]  optional: now in milliseconds (tests); empty means Redis server TIME
--
-- Returns the tokens now held in the window's current second.

if redis.replicate_commands then redis.replicate_commands() end

-- @include token_window

local now
if ARGV[2] and ARGV[2] ~= '' then
  now = math.floor(tonumber(ARGV[2]) * 1000 + 0.5) -- rounded, as LocalLimiter does
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_s = math.floor(now / 1000000)

local held = redis.call('HINCRBY', KEYS[1], now_s, ARGV[1])
redis.call('HINCRBY', KEYS[1], 'sum', ARGV[1])
redis.call('HSETNX', KEYS[1], 'lo', now_s)
local hi = tonumber(redis.call('HGET', KEYS[1], 'hi'))
if hi == nil or now_s > hi then
  redis.call('HSET', KEYS[1], 'hi', now_s)
  hi = now_s
end
-- The newest bucket leaves the window at the start of second hi + 60; the key
-- lives exactly that long, so an idle caller's key disappears by itself.
redis.call('PEXPIRE', KEYS[1], math.ceil(((hi + 60) * 1000000 - now) / 1000))

-- Checks prune old buckets; prune here too so a caller charged often but
-- rarely checked cannot grow the hash past one minute of seconds.
if redis.call('HLEN', KEYS[1]) > 64 then prune_window(KEYS[1], now_s - 59) end
return held
