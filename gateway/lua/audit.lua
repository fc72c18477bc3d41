-- Append audit records to an audit shard exactly once per (producer, sequence), a batch per entry.
--
-- Each gateway process is one producer and numbers its records 1, 2, 3... in the
-- order it made them, and sends them in that order (directly, or later from its
-- spool). The producer's high-water mark lives next to the stream; a record at or
-- below it has been appended before (a reply lost in a timeout, a spool replayed
-- twice) and is skipped. Mark, entries and counts change in one atomic step.
--
-- The records come packed as the entries they become (gateway/storage/audit_entries.py: up to
-- 256 records of consecutive sequences each, their JSON as one array, a record per line), so a
-- call costs a few commands however many records it carries, and the script never touches a
-- record on its own: an entry partly at or below the mark loses that many records from its front.
--
-- KEYS[1]  the audit stream (shard)
-- KEYS[2]  the producer's high-water mark (same Cluster slot as the stream)
-- KEYS[3]  the shard's record counts (same slot; see audit_trim.lua)
-- ARGV[1]  the shard's cap in records (audit.stream_maxlen)
-- ARGV[2]  seconds the mark lives after its last use
-- ARGV[3]  the producer id, stored with each entry
-- ARGV[4]  the archiver's consumer group, or '' when archiving is off
-- ARGV[5]  records beyond the cap before a trim
-- ARGV[6..] triples, ascending: first sequence, records, their JSON array ("[" r1 ",\n" r2 ... "]")
--
-- Returns {records appended, records trimmed}. Archiving off: the oldest entries go once the cap
-- is passed, and every record they held went unread. Archiving on: only entries the archiver
-- acknowledged go.

-- @include audit_trim

local top = tonumber(redis.call('GET', KEYS[2]) or '0')
local appended, trimmed = record_counts(KEYS[1], KEYS[3])
local added, entries, producer = 0, 0, ARGV[3]
for i = 6, #ARGV, 3 do
  local first, count, batch = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2]
  local last = first + count - 1
  if last > top then
    local skip = math.max(top - first + 1, 0)
    if skip > 0 then
      local at = 2
      for _ = 1, skip do
        at = string.find(batch, ',\n', at, true) + 2
      end
      batch = '[' .. string.sub(batch, at)
    end
    local n = count - skip
    appended = appended + n
    added = added + n
    entries = entries + 1
    redis.call(
      'XADD', KEYS[1], '*',
      'n', n,
      'total', appended,
      'id', producer .. ':' .. string.format('%d-%d', first + skip, last),
      'b', batch
    )
    top = last
  end
end
if added > 0 then
  redis.call('HSET', KEYS[3], 'appended', appended)
  redis.call('HINCRBY', KEYS[3], 'entries', entries)
end
redis.call('SET', KEYS[2], string.format('%d', top), 'EX', ARGV[2])
return {added, trim_records(KEYS[1], KEYS[3], appended, trimmed, tonumber(ARGV[1]), tonumber(ARGV[5]), ARGV[4])}
