-- Write back what a gateway's local limiter admitted while Redis was away, so that
-- a caller does not get a fresh burst when Redis returns (docs/contract.md §5).
--
-- KEYS[1]  request key: the GCRA theoretical arrival time (TAT), integer microseconds
-- KEYS[2]  token key: the token window hash (see token_window.lua)
-- ARGV[1]  request spend still owed: µs of GCRA emission (admitted intervals, less what drained)
-- ARGV[2]  tokens charged locally (charged to the current second: they count a little
--          longer than they would have, never shorter)
-- ARGV[3]  optional: now in milliseconds (tests); empty means Redis server TIME
--
-- Returns the TAT after the write-back.

if redis.replicate_commands then redis.replicate_commands() end

-- @include token_window

local now
if ARGV[3] and ARGV[3] ~= '' then
  now = math.floor(tonumber(ARGV[3]) * 1000 + 0.5) -- rounded, as LocalLimiter does
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local debt = tonumber(ARGV[1]) or 0
if debt > 0 then
  tat = tat + debt
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
local tokens = tonumber(ARGV[2]) or 0
if tokens > 0 then add_tokens(KEYS[2], now, tokens) end
return string.format('%.0f', tat)
