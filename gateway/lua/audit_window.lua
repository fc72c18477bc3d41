-- One page of an audit shard, newest first, as the stored records alone (or with their ids).
--
-- An impact preview reads a window of hours (up to a million records) page by page. XREVRANGE's own
-- reply (each entry an id and a field list) costs the reading process several times what the
-- records' JSON does; this one is flat, so the gateway's event loop reads it almost for free.
--
-- KEYS[1]  the audit shard's stream
-- ARGV[1]  the newest id to include ("+", or "(<id>" to resume below an id already read)
-- ARGV[2]  the oldest id to include ("<ms>-0")
-- ARGV[3]  at most this many entries
-- ARGV[4]  "1": each record preceded by its entry id (to merge several shards by id); else ""
--
-- Returns {entries read, id of the last (oldest) one or "", [id,] record JSON...}; an entry without
-- a record field counts as read and adds nothing.

local entries = redis.call('XREVRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local with_ids = ARGV[4] == '1'
local out = {#entries, ''}
for i = 1, #entries do
  local fields = entries[i][2]
  for j = 1, #fields, 2 do
    if fields[j] == 'r' then
      if with_ids then
        out[#out + 1] = entries[i][1]
      end
      out[#out + 1] = fields[j + 1]
      break
    end
  end
end
if #entries > 0 then
  out[2] = entries[#entries][1]
end
return out
