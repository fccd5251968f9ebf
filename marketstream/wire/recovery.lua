-- marketstream recoverable publish: one atomic call assigns the stream's next
-- position, appends the message to a capped history, optionally stores a
-- snapshot, and publishes.  Redis >= 6.2 (SPUBLISH needs Redis 7).
--
-- Call (any language; load once with SCRIPT LOAD, then EVALSHA; on a NOSCRIPT
-- error SCRIPT LOAD again and retry):
--
--   EVALSHA <sha1> 3 {S}:seq {S}:log {S}:snap  S <data-json> <history> <ttl> <snapmode> <snapdata-json> <pubcmd>
--
--   S              stream name = pub/sub channel, e.g. trade.SOL_USDC; no
--                  whitespace, control characters, '"', '\', '{', '}' or '/'
--                  (the keys use S as their Cluster hash tag, so keys and
--                  channel share one slot).  The three keys must be exactly
--                  {S}:seq {S}:log {S}:snap: a call with another stream's keys
--                  is refused (it would write that stream's history)
--   data-json      the message's data as JSON text (one JSON object), used
--                  verbatim; servers drop a message whose data is not one
--   history        number of messages kept in {S}:log (exact MAXLEN); 0 = none,
--                  at most 1000000
--   ttl            seconds before all three keys expire; 0 = never, at most
--                  31536000 (a year)
--   snapmode       "" or "none": no snapshot; "self": this message's data is
--                  the stream's snapshot; "data": snapdata-json is the snapshot
--                  (the state after this message)
--   snapdata-json  JSON text of the snapshot (ignored unless snapmode = data)
--   pubcmd         "publish", or "spublish" on Redis Cluster
--
-- Reply: the message's position (integer).  Positions of one stream rise by
-- exactly 1 per message while {S}:seq exists; when it is missing (new stream,
-- history lost or expired) the first position is Redis TIME in microseconds,
-- so it is larger than every earlier one and stays below 2^53.
--
-- Published payload on channel S, and stored as field "p" of the history
-- entry with ID <seq>-0:
--
--   @<seq> {"stream":"<S>","data":<data-json>,"seq":<seq>}
--
-- The snapshot {S}:snap has the same form with the snapshot as data.
-- Example (redis-cli):
--
--   redis-cli SCRIPT LOAD "$(cat recovery.lua)"
--   redis-cli EVALSHA <sha1> 3 '{trade.X}:seq' '{trade.X}:log' '{trade.X}:snap' \
--             trade.X '{"e":"trade","p":"1.5"}' 1000 3600 '' '' publish

local seq_key, log_key, snap_key = KEYS[1], KEYS[2], KEYS[3]
local stream, data = ARGV[1], ARGV[2]
local history, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local snapmode, snapdata, pubcmd = ARGV[5], ARGV[6], ARGV[7]

-- Every check comes before the first write: a refused call changes nothing.
if #KEYS ~= 3 or stream == nil or stream == '' or string.find(stream, '[%s%c"\\{}/]') then
  return redis.error_reply('ERR marketstream: the stream name must be non-empty, without '
                           .. 'whitespace, control characters, \'"\', \'\\\', \'{\', \'}\' or \'/\'')
end
local tag = '{' .. stream .. '}'
if seq_key ~= tag .. ':seq' or log_key ~= tag .. ':log' or snap_key ~= tag .. ':snap' then
  return redis.error_reply('ERR marketstream: the keys must be ' .. tag .. ':seq ' .. tag
                           .. ':log ' .. tag .. ':snap for stream ' .. stream)
end
if history == nil or history < 0 or history % 1 ~= 0 or ttl == nil or ttl < 0 or ttl % 1 ~= 0 then
  return redis.error_reply('ERR marketstream: history and ttl must be integers >= 0')
end
if history > 1000000 or ttl > 31536000 then
  return redis.error_reply('ERR marketstream: history is at most 1000000, ttl at most 31536000')
end
if pubcmd ~= 'publish' and pubcmd ~= 'spublish' then
  return redis.error_reply('ERR marketstream: pubcmd must be publish or spublish')
end
if snapmode ~= '' and snapmode ~= 'none' and snapmode ~= 'self' and snapmode ~= 'data' then
  return redis.error_reply('ERR marketstream: snapmode must be "", none, self or data')
end

local seq = redis.call('INCR', seq_key)
if seq == 1 then
  -- The key was missing: start above every position this stream ever had.
  local now = redis.call('TIME')
  seq = tonumber(now[1]) * 1000000 + tonumber(now[2])
  -- A history that outlived its counter (never expected: both share one TTL)
  -- must not make XADD fail: continue after its last ID.
  if redis.call('EXISTS', log_key) == 1 then
    local info = redis.call('XINFO', 'STREAM', log_key)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local last = tonumber(string.match(info[i + 1], '^(%d+)'))
        if last ~= nil and last >= seq then seq = last + 1 end
      end
    end
  end
  redis.call('SET', seq_key, string.format('%.0f', seq))
end
local id = string.format('%.0f', seq)

local frame = '{"stream":"' .. stream .. '","data":' .. data .. ',"seq":' .. id .. '}'
local payload = '@' .. id .. ' ' .. frame

if history > 0 then
  redis.call('XADD', log_key, 'MAXLEN', history, id .. '-0', 'p', payload)
else
  redis.call('DEL', log_key)
end

if snapmode == 'self' then
  redis.call('SET', snap_key, payload)
elseif snapmode == 'data' then
  redis.call('SET', snap_key,
             '@' .. id .. ' {"stream":"' .. stream .. '","data":' .. snapdata .. ',"seq":' .. id .. '}')
end

if ttl > 0 then
  redis.call('EXPIRE', seq_key, ttl)
  redis.call('EXPIRE', log_key, ttl)
  redis.call('EXPIRE', snap_key, ttl)
else
  redis.call('PERSIST', seq_key)
  redis.call('PERSIST', log_key)
  redis.call('PERSIST', snap_key)
end

redis.call(pubcmd, stream, payload)
return seq
