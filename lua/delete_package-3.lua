--[[
  Remove one package row and its index entry, atomically; routes are not touched.

  KEYS[1]  {ns}:format    layout marker (string)
  KEYS[2]  {ns}:packages  index (zset, score 0, member "<stamp> <row id>")
  KEYS[3]  {ns}:pkg:<row id>  the package row (hash)

  ARGV[1]  layout version the caller writes
  ARGV[2]  row id, "<type>\0<hash>"

  Checks first (check_call in lua/library.lua) that KEYS are these three of one
  namespace, {ns} being KEYS[1]'s, KEYS[3] the row of ARGV[2], and that ARGV holds
  these two.

  Reply:
    1  the row was removed
    0  there was no such row (a no-op)
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {
  keys = {'format', 'packages', ROW}, row = 2, args = 2,
})
if refused then
  return refused
end
local _
_, refused = layout(KEYS, ARGV[1])
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
