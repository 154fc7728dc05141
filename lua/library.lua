--[[
  What every operation of the kvstore library shares. kvstore/redis/scripts.py builds the
  library's text from this file first, then each lua/<operation>-<number of KEYS>.lua
  registered as a function whose body sees its keys and arguments as KEYS and ARGV.

  Every operation checks the keys it touches before it writes anything, and replies one
  of these errors, with nothing written, when a check fails:

    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds a <found> (a type as TYPE
        names it) where the operation needs a <expected>: "string", "hash", "zset", or
        "counter" (a string holding an integer)
    error "KVSTORE_FORMAT <found>"  KEYS[1], the layout marker, says another layout
]]

-- Redis does not undo a script's writes when a later command of it fails, so a key of
-- the wrong type (someone else's data in the namespace) must stop an operation before
-- its first write: every key is checked up front.
-- `kinds[i]` is what KEYS[i] must hold when it exists; the error reply, or nil.
local function wrong_type(keys, kinds)
  for i, kind in ipairs(kinds) do
    local found = redis.call('TYPE', keys[i])['ok']
    if found ~= 'none' then
      local wanted = kind
      if kind == 'counter' then
        wanted = 'string'
      end
      if found ~= wanted
        or (kind == 'counter' and not string.match(redis.call('GET', keys[i]), '^%-?%d+$'))
      then
        return redis.error_reply(string.format('KVSTORE_TYPE %d %s %s', i, found, kind))
      end
    end
  end
  return nil
end

-- The error reply when `keys` do not hold what `kinds` says, or when the layout marker
-- keys[1] names another layout than `version`; nil when the operation may go on.
local function refusal(keys, kinds, version)
  local wrong = wrong_type(keys, kinds)
  if wrong then
    return wrong
  end
  local found = redis.call('GET', keys[1])
  if found and found ~= version then
    return redis.error_reply('KVSTORE_FORMAT ' .. found)
  end
  return nil
end

-- The routes table's next version, from the counter at `key` (the route version rule).
-- A counter made anew (the namespace's first route, or after FLUSHDB or a restart that
-- kept no data) starts at the server's clock in microseconds, so it starts above every
-- version the lost one reached: a route cache holding an old version sees the new ones
-- as newer.
local function next_route_version(key)
  if redis.call('EXISTS', key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', key, string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
  return redis.call('INCR', key)
end
