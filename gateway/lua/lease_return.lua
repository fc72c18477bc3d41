-- Giving back a lease's unused units, shared by ratelimit.lua and release.lua (each includes this
-- file where its "-- @include lease_return" line stands).
--
-- A lease of n units moved the caller's TAT forward by n emission intervals, to `lease_end`. Its
-- unused units are given back only while the TAT still ends there (no process reserved after it):
-- moving the TAT back under a later reservation would shift that reservation's units too. And only
-- the part still ahead of `now`: units whose time has passed came back by themselves.

-- Returns the caller's TAT after the give-back (`tat` unchanged when nothing was given back).
local function give_back(key, tat, now, lease_end, units, interval)
  if tat ~= lease_end then return tat end
  local credit = math.min(units * interval, lease_end - now)
  if credit <= 0 then return tat end
  tat = lease_end - credit
  if tat > now then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
  else
    redis.call('DEL', key)
  end
  return tat
end
