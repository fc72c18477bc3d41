-- Trim an archived stream to about `maxlen` entries, removing only entries the archiver's
-- consumer group has acknowledged (written to the archive for good). Included by audit.lua and
-- archive_ack.lua; returns the number of entries removed.
--
-- The floor is the first entry not yet acknowledged: the group's smallest pending id, or, with
-- nothing pending, just past its last delivered id. With no group (the archiver never ran)
-- nothing is acknowledged and nothing is trimmed.
local function archived_floor(key, group)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
  if not ok then
    return nil
  end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do
      info[g[i]] = g[i + 1]
    end
    if info['name'] == group then
      if tonumber(info['pending']) > 0 then
        return redis.call('XPENDING', key, group)[2]
      end
      local ms, sq = string.match(info['last-delivered-id'], '^(%d+)-(%d+)$')
      return ms .. '-' .. string.format('%d', tonumber(sq) + 1)
    end
  end
  return nil
end

local function trim_archived(key, group, maxlen)
  local excess = redis.call('XLEN', key) - maxlen
  if excess <= 0 then
    return 0
  end
  local floor = archived_floor(key, group)
  if not floor then
    return 0
  end
  -- Approximate (whole stream nodes), as MAXLEN ~ is, and never more than the excess.
  return redis.call('XTRIM', key, 'MINID', '~', floor, 'LIMIT', excess)
end
