--[[
  Collect one blob (layout 2) that no row referred to when `kvstore gc` looked, unless a
  put wrote or re-used it since the cut-off: the last step of a mark-and-sweep, so a blob
  a put in flight has written and not yet referenced is never removed.

  KEYS[1]  ns/blob/{<digest>}  the blob (hash: archive, written)

  ARGV[1]  the blob's digest: SHA-256, 64 lowercase hex digits
  ARGV[2]  the cut-off: the server's TIME in microseconds, decimal; a blob written at or
           after it is kept

  Checks first that KEYS[1] is the blob key of ARGV[1] in a namespace and that ARGV
  holds these two.

  Reply:
    1  the blob was removed
    0  it was written at or after the cut-off, or there is no such blob: nothing removed
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing removed
    error "KVSTORE_TYPE 1 <found> hash"  KEYS[1] holds another type; nothing removed
]]
local refused = check_blob_call(KEYS, ARGV, 2)
if refused then
  return refused
end
local cutoff = tonumber(ARGV[2])
if not cutoff or not string.match(ARGV[2], '^%d+$') then
  return redis.error_reply('KVSTORE_ARGS ARGV[2] is not a time in microseconds')
end
local written
written, refused = checked(KEYS, 1, 'hash', 'HGET', KEYS[1], 'written')
if refused then
  return refused
end
if not written then
  -- No blob, or a blob whose stamp is lost: kept, so damage is reported (check), never
  -- settled by removing what a row may still need.
  return 0
end
if (tonumber(written) or cutoff) >= cutoff then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
