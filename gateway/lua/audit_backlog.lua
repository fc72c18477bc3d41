-- The audit records of one shard the archiver has not yet acknowledged.
--
-- Counted by the running totals of batch entries (gateway/storage/audit_entries.py): the shard's
-- total so far, less the total before the first entry not yet acknowledged; one entry read, however
-- long the backlog. When that entry is a single-record one (an older gateway appended it) the totals
-- cannot say, and the answer is -1: the caller counts entries instead.
--
-- KEYS[1]  the audit shard's stream
-- KEYS[2]  its record counts (see audit_trim.lua)
-- ARGV[1]  the archiver's consumer group
--
-- Returns the records not yet archived (all the shard holds while the group does not exist), or -1.

-- @include audit_trim

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local floor = archived_floor(KEYS[1], ARGV[1])
if not floor then
  local appended, trimmed = record_counts(KEYS[1], KEYS[2])
  return held_records(KEYS[1], KEYS[2], appended, trimmed)
end
local first = redis.call('XRANGE', KEYS[1], floor, '+', 'COUNT', 1)[1]
if not first then
  return 0
end
-- The counts take in what older gateways appended, so `appended` is the total through the newest entry.
local appended = record_counts(KEYS[1], KEYS[2])
local first_total = tonumber(entry_field(first[2], 'total') or '')
if not first_total or appended < first_total then
  return -1
end
return appended - first_total + entry_count(first[2])
