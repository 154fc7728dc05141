--[[
  What every operation of the kvstore library shares. kvstore/redis/scripts.py builds the
  library's text from this file first, then each lua/<operation>-<number of KEYS>.lua
  registered as a function whose body sees its keys and arguments as KEYS and ARGV.

  Every operation checks its call (check_call, below: its KEYS and its channel are the
  keys of one namespace it takes, in its order) and the keys it touches before it writes
  anything, and replies one of these errors, with nothing written, when a check fails:

    error "KVSTORE_ARGS <argument> <why>"  the call is not one this library's callers
        make: <argument>, "KEYS[i]" or "ARGV[i]", is missing, one too many, or not the
        key (or channel) of KEYS[1]'s namespace the operation takes there; <why> says
        which, in words ("is not {ns}:routes", "is missing", "is one too many", "is not
        a layout marker {ns}:format")
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds a <found> (a type as TYPE
        names it) where the operation needs a <expected>: "string", "hash", "zset", or
        "counter" (a string holding an integer)
    error "KVSTORE_FORMAT <found>"  KEYS[1], the layout marker, says another layout

  Every operation that writes routes announces the change with announce_routes, below,
  whose comment gives the message byte for byte. kvstore/redis/protocol.py recognises
  these errors and encodes and decodes that message, so both sides say them once.
]]

-- The call's shape. Every operation's first step, before any read or write: a caller
-- that mixes namespaces (another namespace's channel, say) would otherwise have the
-- operation write in one and fail, or announce, in another. Not a security boundary (the
-- server's ACL is: functions run with the caller's rights); the check makes a call of
-- the wrong shape change nothing at all.

-- A key of the namespace that follows it with ARGV[shape.row], the row id.
local ROW = 'pkg:'
-- The key of the blob named by ARGV[shape.digest]: "<ns>/blob/{<digest>}", the namespace
-- without its braces, the digest as the key's hash tag (kvstore/redis/keyspace.py).
local BLOB = 'blob'

local function misuse(argument, why)
  return redis.error_reply('KVSTORE_ARGS ' .. argument .. ' ' .. why)
end

-- nil when the call of an operation is of `shape`, else the refusal (KVSTORE_ARGS):
--   shape.keys     what follows "{ns}:" in each KEYS[i], in order; the first is 'format',
--                  whose KEYS[1] names the namespace ("{ns}", 1 to 64 of A-Z a-z 0-9
--                  _ . : -, as kvstore/redis/keyspace.py checks it), and ROW is followed
--                  by ARGV[shape.row]
--   shape.args     how many ARGV the operation takes; shape.more: or more
--   shape.channel  the ARGV that is "{ns}:route-changes", if any
--   shape.digest   the ARGV that is the digest BLOB's key carries: 64 lowercase hex digits
local function check_call(keys, argv, shape)
  local names = shape.keys
  if #keys ~= #names then
    local i = math.min(#keys, #names) + 1
    return misuse('KEYS[' .. i .. ']', #keys < #names and 'is missing' or 'is one too many')
  end
  if #argv < shape.args then
    return misuse('ARGV[' .. (#argv + 1) .. ']', 'is missing')
  end
  if #argv > shape.args and not shape.more then
    return misuse('ARGV[' .. (shape.args + 1) .. ']', 'is one too many')
  end
  local prefix = string.match(keys[1], '^({[A-Za-z0-9_.:%-]+}:)format$')
  if not prefix or #prefix > 64 + 3 then
    return misuse('KEYS[1]', 'is not a layout marker {ns}:format')
  end
  if shape.digest then
    local digest = argv[shape.digest]
    if #digest ~= 64 or string.find(digest, '[^0-9a-f]') then
      return misuse('ARGV[' .. shape.digest .. ']', 'is not a digest (64 of 0-9 a-f)')
    end
  end
  for i = 2, #names do
    local name = names[i]
    if name == BLOB then
      local digest = argv[shape.digest]
      local blob = string.sub(prefix, 2, -3) .. '/blob/{' .. digest .. '}'
      if keys[i] ~= blob then
        return misuse('KEYS[' .. i .. ']', 'is not ' .. string.sub(prefix, 2, -3)
          .. '/blob/{<ARGV[' .. shape.digest .. ']>}')
      end
    else
      if name == ROW then
        name = ROW .. argv[shape.row]
      end
      if keys[i] ~= prefix .. name then
        return misuse('KEYS[' .. i .. ']', 'is not ' .. prefix .. names[i]
          .. (names[i] == ROW and ('<ARGV[' .. shape.row .. ']>') or ''))
      end
    end
  end
  if shape.channel and argv[shape.channel] ~= prefix .. 'route-changes' then
    return misuse('ARGV[' .. shape.channel .. ']', 'is not ' .. prefix .. 'route-changes')
  end
  return nil
end

-- nil when the call of an operation on one blob is of its shape, else the refusal
-- (KVSTORE_ARGS): KEYS[1] the blob "<ns>/blob/{<digest>}" of a namespace, ARGV[1] that
-- digest (64 lowercase hex digits), and `args` ARGV in all. The namespace has no other
-- key on the blob's node to check against: its name alone is checked.
local function check_blob_call(keys, argv, args)
  if #keys ~= 1 then
    return misuse('KEYS[' .. math.min(#keys, 1) + 1 .. ']', #keys < 1 and 'is missing' or 'is one too many')
  end
  if #argv ~= args then
    return misuse('ARGV[' .. math.min(#argv, args) + 1 .. ']',
      #argv < args and 'is missing' or 'is one too many')
  end
  local digest = argv[1]
  if #digest ~= 64 or string.find(digest, '[^0-9a-f]') then
    return misuse('ARGV[1]', 'is not a digest (64 of 0-9 a-f)')
  end
  local namespace = string.match(keys[1], '^([A-Za-z0-9_.:%-]+)/blob/{' .. digest .. '}$')
  if not namespace or #namespace > 64 then
    return misuse('KEYS[1]', 'is not ns/blob/{<ARGV[1]>}')
  end
  return nil
end

-- Redis does not undo a script's writes when a later command of it fails, so a key of
-- the wrong type (someone else's data in the namespace) must stop an operation before
-- its first write. Each key is checked by a command the operation needs anyway where
-- one can be (a read, or the first write: refused with WRONGTYPE, it changes nothing),
-- and by TYPE otherwise, so a check costs no call of its own where it need not.

-- The refusal of an operation because keys[i] holds something other than a `kind`.
local function type_refusal(keys, i, kind)
  local found = redis.call('TYPE', keys[i])['ok']
  return redis.error_reply(string.format('KVSTORE_TYPE %d %s %s', i, found, kind))
end

-- nil when keys[i] is absent or holds a `kind` (as TYPE names it), else the refusal.
local function not_of_type(keys, i, kind)
  local found = redis.call('TYPE', keys[i])['ok']
  if found ~= 'none' and found ~= kind then
    return redis.error_reply(string.format('KVSTORE_TYPE %d %s %s', i, found, kind))
  end
  return nil
end

-- `redis.pcall(...)`, a command on keys[i], which needs a `kind` there: its reply and
-- nil; or nil and the refusal when keys[i] holds another type; or nil and the error
-- when the server refused the command for another reason.
local function checked(keys, i, kind, ...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply['err'] then
    if string.find(tostring(reply['err']), 'WRONGTYPE', 1, true) then
      return nil, type_refusal(keys, i, kind)
    end
    return nil, reply
  end
  return reply, nil
end

-- The layout marker keys[1] (false when absent) and nil; or nil and the refusal when it
-- is not a string, or names another layout than `version`.
local function layout(keys, version)
  local found, refused = checked(keys, 1, 'string', 'GET', keys[1])
  if refused then
    return nil, refused
  end
  if found and found ~= version then
    return nil, redis.error_reply('KVSTORE_FORMAT ' .. found)
  end
  return found, nil
end

-- The largest version a message can carry exactly: Lua's numbers are doubles.
local MAX_ROUTE_VERSION = 9007199254740991 -- 2^53 - 1

-- The route version counter keys[i] (false when absent) and nil; or nil and the refusal
-- when it is not a counter the next write can raise: an integer as INCR reads one (no
-- sign but '-', no leading zero) whose successor a double still holds exactly. Refused
-- here, before the first write, rather than by INCR after the others (which would leave
-- the row and routes written with no version raised and no change announced). Versions
-- start at the server's clock in microseconds, about 2^51 today: 2^53 is centuries away.
local function route_counter(keys, i)
  local found, refused = checked(keys, i, 'counter', 'GET', keys[i])
  if refused then
    return nil, refused
  end
  if found then
    local digits = string.match(found, '^%-?([1-9]%d*)$') or (found == '0' and '0')
    if not digits or #digits > 16
      or tonumber(found) >= MAX_ROUTE_VERSION or tonumber(found) < -MAX_ROUTE_VERSION then
      return nil, type_refusal(keys, i, 'counter')
    end
  end
  return found, nil
end

-- The routes table's next version, written to the counter at `key`, which holds `found`
-- (as route_counter read it). A counter made anew (the namespace's first route, or
-- after FLUSHDB or a restart that kept no data) starts at the server's clock in
-- microseconds, so it starts above every version the lost one reached: a route cache
-- holding an old version sees the new ones as newer.
local function next_route_version(key, found)
  if not found then
    local t = redis.call('TIME')
    local version = tonumber(t[1]) * 1000000 + tonumber(t[2]) + 1
    redis.call('SET', key, string.format('%d', version))
    return version
  end
  return redis.call('INCR', key)
end

-- Route changes. Every operation that writes routes publishes (SPUBLISH) what it wrote
-- on the namespace's channel {ns}:route-changes, after its writes, as one message:
--
--   "<version>\0<hash>\0<type>[\0<type>...]"
--
-- <version> the routes table's new version in decimal (as next_route_version returned
-- it), <hash> the content hash the routes now point at, then each workflow type whose
-- route was written, at least one. Types and hashes are UTF-8 text that never contains
-- NUL, so NUL separates the fields. A route cache applies the messages in version order;
-- kvstore/redis/protocol.py (encode_route_change, decode_route_change) makes and reads
-- the same bytes, and tests/test_protocol.py checks this function publishes them.
local function announce_routes(channel, version, content_hash, types)
  local message = string.format('%d', version) .. '\0' .. content_hash .. '\0'
    .. table.concat(types, '\0')
  -- Sharded publish: the channel carries the namespace's tag, so on a cluster the message
  -- stays on the shard that holds the namespace, where its route caches subscribe.
  redis.call('SPUBLISH', channel, message)
end

-- The server's clock in microseconds.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Whether `reply` is an error reply (a refusal).
local function is_refusal(reply)
  return type(reply) == 'table' and reply['err'] ~= nil
end

-- Blobs (layout 2). A put writes the archive's blob, or writes it again when it exists
-- (same digest, same bytes: a damaged copy is mended), and stamps it with the server's
-- clock: `kvstore gc` spares a blob written within its grace period, so a blob a put in
-- flight has written and not yet referenced is never collected.
local function write_blob(key, archive)
  redis.call('HSET', key, 'archive', archive, 'written', string.format('%d', now_us()))
end

-- Store a package row and re-point routes at it, announcing the change: what every put
-- shares, after its call was checked (check_call). keys: format, packages, routes,
-- route-version, row, as put_package-5.lua gives them; argv[1] the layout the caller
-- writes, argv[2] the channel, argv[3] the row id, argv[4] the stamp, argv[hash_at] the
-- content hash the routes point at, argv[types_from..] the types (at least one). The row
-- gets `fields` (with deployed_at) and loses `drop` (the other layout's fields: a row of
-- layout 1 put again in layout 2 keeps no archive of its own, and the reverse).
-- Replies the routes table's new version, or a refusal with nothing written.
local function store_package(keys, argv, fields, drop, hash_at, types_from)
  local format, refused = layout(keys, argv[1])
  if refused then
    return refused
  end
  local old
  old, refused = checked(keys, 5, 'hash', 'HGET', keys[5], 'deployed_at')
  if refused then
    return refused
  end
  local counter
  counter, refused = route_counter(keys, 4)
  if refused then
    return refused
  end
  refused = not_of_type(keys, 3, 'hash')
  if refused then
    return refused
  end
  -- The first write also checks the index's type.
  local _
  _, refused = checked(keys, 2, 'zset', 'ZADD', keys[2], 0, argv[4] .. ' ' .. argv[3])
  if refused then
    return refused
  end
  if old and old ~= argv[4] then
    redis.call('ZREM', keys[2], old .. ' ' .. argv[3])
  end
  if not format then
    redis.call('SET', keys[1], argv[1])
  end
  if #drop > 0 then
    redis.call('HDEL', keys[5], unpack(drop))
  end
  redis.call('HSET', keys[5], 'deployed_at', argv[4], unpack(fields))
  local types = {}
  for i = types_from, #argv do
    redis.call('HSET', keys[3], argv[i], argv[hash_at])
    types[#types + 1] = argv[i]
  end
  -- The counter and the message are written with the routes, so a cache that holds
  -- version N holds exactly the table the server held at N.
  local version = next_route_version(keys[4], counter)
  announce_routes(argv[2], version, argv[hash_at], types)
  return version
end
