-- Gives back the unused units of a lapsed lease (see lease_return.lua), off the request path.
--
-- KEYS[1]  request key: the GCRA TAT, integer microseconds
-- ARGV[1]  emission interval in microseconds
-- ARGV[2]  the lease's end (the TAT its grant left)
-- ARGV[3]  its unused units
-- ARGV[4]  optional: now in milliseconds (tests); empty means Redis server TIME
--
-- Returns 1 when the units were given back, 0 when a later reservation kept them.

if redis.replicate_commands then redis.replicate_commands() end

-- @include lease_return

local now
if ARGV[4] and ARGV[4] ~= '' then
  now = math.floor(tonumber(ARGV[4]) * 1000 + 0.5)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local after = give_back(KEYS[1], tat, now, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[1]))
if after == tat then return 0 end
return 1
