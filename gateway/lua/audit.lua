-- Append audit records to the audit stream exactly once per (producer, sequence).
--
-- Each gateway process is one producer and numbers its records 1, 2, 3... in the
-- order it made them, and sends them in that order (directly, or later from its
-- spool). The producer's high-water mark lives next to the stream; a record at or
-- below it has been appended before (a reply lost in a timeout, a spool replayed
-- twice) and is skipped. Mark and stream change in one atomic step.
--
-- KEYS[1]  the audit stream
-- KEYS[2]  the producer's high-water mark (same Cluster slot as the stream)
-- ARGV[1]  MAXLEN for the stream (approximate trimming)
-- ARGV[2]  seconds the mark lives after its last use
-- ARGV[3]  the producer id, stored with each entry
-- ARGV[4]  the archiver's consumer group, or '' when archiving is off
-- ARGV[5..] pairs: sequence, record JSON (ascending sequence)
--
-- Returns {records appended, entries trimmed}. Archiving off: MAXLEN trimming, and every
-- entry it removes went unread. Archiving on: only entries the archiver acknowledged go.

-- @include archived_floor

local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
local top = mark
local added = 0
local before = redis.call('XLEN', KEYS[1])
local group = ARGV[4]
for i = 5, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > top then
    if group == '' then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[i + 1], 'id', ARGV[3] .. ':' .. ARGV[i])
    else
      redis.call('XADD', KEYS[1], '*', 'r', ARGV[i + 1], 'id', ARGV[3] .. ':' .. ARGV[i])
    end
    top = seq
    added = added + 1
  end
end
redis.call('SET', KEYS[2], top, 'EX', ARGV[2])
local trimmed
if group == '' then
  trimmed = before + added - redis.call('XLEN', KEYS[1])
else
  trimmed = trim_archived(KEYS[1], group, tonumber(ARGV[1]))
end
return {added, trimmed}
