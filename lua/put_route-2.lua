--[[
  Point one workflow type's route at a content hash; no archive is touched.

  KEYS[1]  {ns}:format    layout marker
  KEYS[2]  {ns}:routes    routes (hash, type -> content hash)

  ARGV[1]  layout version the caller writes
  ARGV[2]  workflow type
  ARGV[3]  content hash

  Reply:
    1  the route is new
    0  an existing route was re-pointed (or already pointed there)
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local found = redis.call('GET', KEYS[1])
if found and found ~= ARGV[1] then
  return redis.error_reply('KVSTORE_FORMAT ' .. found)
end
if not found then
  redis.call('SET', KEYS[1], ARGV[1])
end

return redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
