-- The archiver made a batch durable: acknowledge its entries and trim what is archived.
--
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
-- ARGV[2]  entries to keep in Redis (the recent trail; 0 keeps none beyond the unarchived)
-- ARGV[3..] the entry ids archived
--
-- Returns {entries acknowledged, entries trimmed}.

-- @include archived_floor

local acked = 0
if #ARGV >= 3 then
  acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
end
return {acked, trim_archived(KEYS[1], ARGV[1], tonumber(ARGV[2]))}
