--[[
  Remove one package row and its index entry, atomically; routes are not touched.

  KEYS[1]  {ns}:format    layout marker (string)
  KEYS[2]  {ns}:packages  index (zset, score 0, member "<stamp> <row id>")
  KEYS[3]  {ns}:pkg:<row id>  the package row (hash)

  ARGV[1]  layout version the caller writes
  ARGV[2]  row id, "<type>\0<hash>"

  Reply:
    1  the row was removed
    0  there was no such row (a no-op)
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local _, refused = layout(KEYS, ARGV[1])
if refused then
  return refused
end
local stamp
stamp, refused = checked(KEYS, 3, 'hash', 'HGET', KEYS[3], 'deployed_at')
if refused then
  return refused
end
if not stamp then
  return 0
end
-- The first write also checks the index's type.
_, refused = checked(KEYS, 2, 'zset', 'ZREM', KEYS[2], stamp .. ' ' .. ARGV[2])
if refused then
  return refused
end
redis.call('DEL', KEYS[3])
return 1
