-- The archiver made a batch durable: acknowledge its entries and trim what is archived.
--
-- KEYS[1]  the stream
-- KEYS[2]  an audit shard's record counts (see audit_trim.lua): trim by records; absent (the change
--          history): trim by entries
-- ARGV[1]  the consumer group
-- ARGV[2]  records (entries, without KEYS[2]) to keep in Redis (the recent trail; 0 keeps none
--          beyond the unarchived)
-- ARGV[3]  records beyond ARGV[2] before a trim (with KEYS[2])
-- ARGV[4..] the entry ids archived
--
-- Returns {entries acknowledged, records (entries) trimmed}.

-- @include audit_trim

local acked = 0
if #ARGV >= 4 then
  acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4))
end
local trimmed
if KEYS[2] then
  local appended, gone = record_counts(KEYS[1], KEYS[2])
  trimmed = trim_records(KEYS[1], KEYS[2], appended, gone, tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[1])
else
  trimmed = trim_archived(KEYS[1], ARGV[1], tonumber(ARGV[2]))
end
return {acked, trimmed}
