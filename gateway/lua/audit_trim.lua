-- An audit shard's record counts, and trimming it by records rather than entries. Included by
-- audit.lua and archive_ack.lua (with archived_floor, which it includes).
--
-- A batch entry holds `n` records (gateway/storage/audit_entries.py); a single-record entry (`r`,
-- written by older gateways) counts as one. Beside the stream, in its slot, the hash `counts` holds
-- `appended` (records appended, a running total also written into each batch entry as `total`),
-- `trimmed` (records trimmed since) and `entries` (the stream's entries as these counts know them):
-- the shard holds `appended - trimmed` records.

-- @include archived_floor

local function entry_count(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'n' then
      return tonumber(fields[i + 1]) or 1
    end
  end
  return 1
end

local function entry_field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then
      return fields[i + 1]
    end
  end
  return nil
end

-- {appended, trimmed}. The hash also counts the shard's entries: entries beyond them were appended
-- by older gateways (single records) and are taken in here, one record each, so `appended` (and the
-- next batch entry's `total`) stays the count of every record appended. When the hash is missing (a
-- new shard, a stream older than batch entries, a restore without it) it is rebuilt from the
-- stream's two ends: exact when both are batch entries (their totals span the stream), else every
-- entry counts one record (exact for a stream of single-record entries).
local function record_counts(key, counts)
  local got = redis.call('HMGET', counts, 'appended', 'trimmed', 'entries')
  local length = redis.call('XLEN', key)
  if got[1] then
    local appended, known = tonumber(got[1]), tonumber(got[3] or length)
    if length > known then
      appended = appended + length - known
      redis.call('HSET', counts, 'appended', appended, 'entries', length)
    elseif length < known then
      redis.call('HSET', counts, 'entries', length)  -- trimmed by an older gateway
    end
    return appended, tonumber(got[2] or '0')
  end
  local held, appended = length, length
  if length > 0 then
    local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
    local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
    local last_total = tonumber(entry_field(newest[2], 'total') or '')
    local first_total = tonumber(entry_field(oldest[2], 'total') or '')
    if last_total then
      appended = last_total  -- the totals go on from the newest one
      if first_total then
        held = math.max(last_total - first_total + entry_count(oldest[2]), length)
      end
    end
  end
  redis.call('HSET', counts, 'appended', appended, 'trimmed', appended - held, 'entries', length)
  return appended, appended - held
end

-- Records the shard holds. Never fewer than its entries (each holds one at least): entries an older
-- gateway appended are not in the counts, and are counted one each that way.
local function held_records(key, counts, appended, trimmed)
  local length = redis.call('XLEN', key)
  local held = appended - trimmed
  if held < length or (length == 0 and held ~= 0) then
    held = length
    redis.call('HSET', counts, 'trimmed', appended - held)
  end
  return held
end

-- Once the shard holds more than maxlen + slack records, remove its oldest entries, whole, down to
-- about maxlen records (never fewer); with `group` (archiving on) never an entry at or past the first
-- one the archiver has not acknowledged. `appended` and `trimmed`: the counts as they are now.
-- Returns the records removed.
local function trim_records(key, counts, appended, trimmed, maxlen, slack, group)
  local held = held_records(key, counts, appended, trimmed)
  if held <= maxlen + slack then
    return 0
  end
  local high = '+'
  if group ~= '' then
    local floor = archived_floor(key, group)
    if not floor then
      return 0
    end
    high = '(' .. floor
  end
  local excess = held - maxlen
  local removed, entries, last, low = 0, 0, nil, '-'
  while true do
    local page = redis.call('XRANGE', key, low, high, 'COUNT', 32)
    local stopped = false
    for _, entry in ipairs(page) do
      local n = entry_count(entry[2])
      if removed + n > excess then
        stopped = true
        break
      end
      removed = removed + n
      entries = entries + 1
      last = entry[1]
    end
    if stopped or #page < 32 or removed >= excess then
      break
    end
    low = '(' .. last
  end
  if not last then
    return 0
  end
  local ms, sq = string.match(last, '^(%d+)-(%d+)$')
  redis.call('XTRIM', key, 'MINID', ms .. '-' .. string.format('%d', tonumber(sq) + 1))
  redis.call('HINCRBY', counts, 'trimmed', removed)
  redis.call('HINCRBY', counts, 'entries', -entries)
  return removed
end
