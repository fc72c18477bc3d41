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
return add_tokens(KEYS[1], now, tonumber(ARGV[1]))
