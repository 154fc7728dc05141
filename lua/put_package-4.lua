--[[
  Store one package and re-point routes at it, in one atomic step.

  KEYS[1]  {ns}:format    layout marker
  KEYS[2]  {ns}:packages  index (zset, score 0, member "<stamp> <row id>")
  KEYS[3]  {ns}:routes    routes (hash, type -> content hash)
  KEYS[4]  {ns}:pkg:<row id>  the package row (hash)

  ARGV[1]  layout version the caller writes
  ARGV[2]  row id, "<type>\0<hash>"
  ARGV[3]  deployed_at stamp, 27 bytes
  ARGV[4]  archive bytes
  ARGV[5]  content hash the routes point at
  ARGV[6..] workflow types whose routes are re-pointed (at least one)

  Reply:
    1  a new row was stored
    0  an existing row was replaced
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local found = redis.call('GET', KEYS[1])
if found and found ~= ARGV[1] then
  return redis.error_reply('KVSTORE_FORMAT ' .. found)
end
if not found then
  redis.call('SET', KEYS[1], ARGV[1])
end

local old = redis.call('HGET', KEYS[4], 'deployed_at')
if old and old ~= ARGV[3] then
  redis.call('ZREM', KEYS[2], old .. ' ' .. ARGV[2])
end
redis.call('HSET', KEYS[4], 'archive', ARGV[4], 'deployed_at', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[3] .. ' ' .. ARGV[2])
for i = 6, #ARGV do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[5])
end
if old then
  return 0
end
return 1
