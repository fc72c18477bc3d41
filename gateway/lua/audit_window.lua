-- One page of an audit shard, newest entry first: up to a number of records, as the stored JSON alone.
--
-- An impact preview reads a window of hours (up to a million records) page by page. XREVRANGE's own
-- reply (each entry an id and a field list) costs the reading process several times what the
-- records' JSON does; this one is flat, so the gateway's event loop reads it almost for free.
-- Entries are whole: a batch entry (gateway/storage/audit_entries.py) is answered as its one JSON
-- array, and the page ends with the entry that brings it to the records asked for (it may pass them).
--
-- KEYS[1]  the audit shard's stream
-- ARGV[1]  the newest id to include ("+", or "(<id>" to resume below an id already read)
-- ARGV[2]  the oldest id to include ("<ms>-0", or "-")
-- ARGV[3]  records wanted: entries are read until they hold this many, or the range ends
-- ARGV[4]  "1": each entry preceded by its id (to merge several shards by id); else ""
--
-- Returns {records read, id of the last (oldest) entry read or "", 1 if the range ended else 0,
-- then per entry: [id,] count, payload}: count 0 with a single-record entry's `r`, else a batch
-- entry's `n` with its `b`. An entry with neither is read and adds nothing.

local high, low, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local with_ids = ARGV[4] == '1'
local out = {0, '', 0}
local records, last, ended = 0, nil, false
while records < want do
  local count = math.min(want - records, 64)
  local entries = redis.call('XREVRANGE', KEYS[1], high, low, 'COUNT', count)
  local taken = 0
  for i = 1, #entries do
    local fields = entries[i][2]
    local single, batch, n
    for j = 1, #fields, 2 do
      local name = fields[j]
      if name == 'r' then
        single = fields[j + 1]
      elseif name == 'b' then
        batch = fields[j + 1]
      elseif name == 'n' then
        n = tonumber(fields[j + 1])
      end
    end
    local payload, size = single, 0
    if batch and n then
      payload, size = batch, n
    end
    if payload then
      if with_ids then
        out[#out + 1] = entries[i][1]
      end
      out[#out + 1] = size
      out[#out + 1] = payload
      records = records + math.max(size, 1)
    end
    last = entries[i][1]
    taken = i
    if records >= want then
      break
    end
  end
  if taken == #entries and #entries < count then
    ended = true
    break
  end
  high = '(' .. last
end
out[1] = records
if last then
  out[2] = last
end
if ended then
  out[3] = 1
end
return out
