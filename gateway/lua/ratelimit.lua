-- The per-request rate check: GCRA on the request key and the sliding
-- one-minute token budget, decided together in one round trip.
--
-- KEYS[1]  request key: the GCRA theoretical arrival time (TAT), integer microseconds
-- KEYS[2]  token key: the token window hash (see token_window.lua)
-- ARGV[1]  emission interval in microseconds (60e6 / requests_per_minute)
-- ARGV[2]  burst
-- ARGV[3]  tokens_per_minute; 0 means no token limit
-- ARGV[4]  optional: now in milliseconds (tests); empty means Redis server TIME
-- ARGV[5]  optional: request spend (µs of GCRA emission) a gateway's local limiter admitted
--          while Redis was away, charged before the decision (and kept even when it refuses)
-- ARGV[6]  optional: tokens to charge before the decision (what the local limiter charged while
--          Redis was away, and charges counted by the process and not yet flushed)
-- ARGV[7]  optional: units wanted (a lease, docs/contract.md §5); empty or absent means 1
-- ARGV[8]  optional: the end (TAT) of the caller's previous lease from this process, and
-- ARGV[9]  its unused units: given back first when no one has reserved after it (see release.lua)
--
-- Returns {allowed 0|1, code 0 ok|1 rate_limited|2 token_rate_limited,
--          remaining, reset_us, retry_us, tokens_used (-1 without a token limit),
--          token_reset_us, units granted (0 when refused), TAT after the grant}

-- Redis 5-6: TIME is non-deterministic, so writes after it need effects
-- replication; Redis 7 always replicates effects and ignores this.
if redis.replicate_commands then redis.replicate_commands() end

-- @include token_window
-- @include lease_return

local now
if ARGV[4] and ARGV[4] ~= '' then
  now = math.floor(tonumber(ARGV[4]) * 1000 + 0.5) -- rounded, as LocalLimiter does
else
  -- Server time, so every gateway process measures against the same clock.
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local capacity = interval * burst

local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local back_end = tonumber(ARGV[8] or '') or 0
local back_units = tonumber(ARGV[9] or '') or 0
if back_units > 0 and back_end > 0 then tat = give_back(KEYS[1], tat, now, back_end, back_units, interval) end
if tat < now then tat = now end
local debt = tonumber(ARGV[5] or '0') or 0
if debt > 0 then
  tat = tat + debt
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
local owed_tokens = tonumber(ARGV[6] or '0') or 0
if owed_tokens > 0 then add_tokens(KEYS[2], now, owed_tokens) end
local new_tat = tat + interval
local rate_ok = new_tat - now <= capacity

-- Token window: the 60 one-second buckets ending with the current second.
-- A bucket for second s leaves the window at the start of second s + 60.
local used, token_reset, token_retry = -1, 0, 0
if tpm > 0 then
  used = 0
  local oldest = math.floor(now / 1000000) - 59
  local meta = redis.call('HMGET', KEYS[2], 'sum', 'lo', 'hi')
  local sum, lo, hi = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
  local buckets = nil
  if sum == nil and lo == nil then
    used = 0 -- no window yet (charges always write "sum" and "lo")
  elseif sum == nil or lo == nil or hi == nil or lo < oldest then
    used, buckets = prune_window(KEYS[2], oldest)
    if #buckets > 0 then hi = buckets[#buckets][1] end
  else
    used = sum
  end
  if used > 0 then
    token_reset = (hi + 60) * 1000000 - now
    if used >= tpm then
      -- The budget reopens once enough of the oldest buckets have left: that takes
      -- the buckets themselves (a refused request, so the rare path).
      if buckets == nil then used, buckets = prune_window(KEYS[2], oldest) end
      local left = used
      for _, b in ipairs(buckets) do
        left = left - b[2]
        if left < tpm then
          token_retry = (b[1] + 60) * 1000000 - now
          break
        end
      end
    end
  end
end
local tokens_ok = tpm <= 0 or used < tpm

if rate_ok and tokens_ok then
  -- A lease: a share of what remains (an eighth), never more than asked for, and one alone
  -- when little remains, so the last units at the limit are decided one request at a time.
  local want = tonumber(ARGV[7] or '') or 1
  local granted = 1
  if want > 1 then
    local available = math.floor((capacity - (tat - now)) / interval)
    granted = math.max(1, math.min(want, math.floor(available / 8)))
    new_tat = tat + granted * interval
  end
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
  local remaining = math.floor((capacity - (new_tat - now)) / interval)
  local reset = new_tat - now
  if remaining == 0 then
    -- Nothing left: say when the next request passes, not when the bucket is full.
    reset = new_tat - now - capacity + interval
  end
  return {1, 0, remaining, reset, 0, used, token_reset, granted, new_tat}
end

-- Blocked: nothing is written, so a refused request costs the caller nothing.
local code, remaining, retry = 2, math.floor((capacity - (tat - now)) / interval), token_retry
if not rate_ok then
  code, remaining = 1, 0
  local rate_retry = new_tat - now - capacity
  if rate_retry > retry then retry = rate_retry end
end
local reset = retry
if remaining > 0 then reset = tat - now end
return {0, code, remaining, reset, retry, used, token_reset, 0, tat}
