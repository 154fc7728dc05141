--[[
  Store one package and re-point routes at it, in one atomic step, and announce the
  route change to every route cache of the namespace.

  The namespace's keys and arguments come first and the package's after, so a caller
  can format the part every put shares once.

  KEYS[1]  {ns}:format    layout marker (string)
  KEYS[2]  {ns}:packages  index (zset, score 0, member "<stamp> <row id>")
  KEYS[3]  {ns}:routes    routes (hash, type -> content hash)
  KEYS[4]  {ns}:route-version  version of the routes table (counter; see
           next_route_version in lua/library.lua: made anew, it starts at the server's
           clock in microseconds)
  KEYS[5]  {ns}:pkg:<row id>  the package row (hash)

  ARGV[1]  layout version the caller writes
  ARGV[2]  {ns}:route-changes, the channel the change is published on
  ARGV[3]  row id, "<type>\0<hash>"
  ARGV[4]  deployed_at stamp, 27 bytes
  ARGV[5]  archive bytes
  ARGV[6]  content hash the routes point at
  ARGV[7..] workflow types whose routes are re-pointed (at least one)

  Publishes on ARGV[2], after every write, the route change (announce_routes in
  lua/library.lua): the new value of KEYS[4], ARGV[6], and ARGV[7..].

  Checks first (check_call in lua/library.lua) that KEYS are these five of one
  namespace, {ns} being KEYS[1]'s, KEYS[5] the row of ARGV[3], that ARGV holds seven
  or more and that ARGV[2] is that namespace's channel.

  Reply:
    version  the routes table's new version (an integer; one, so replies parse fast)
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {
  keys = {'format', 'packages', 'routes', 'route-version', ROW}, row = 3,
  args = 7, more = true, channel = 2,
})
if refused then
  return refused
end
local format
format, refused = layout(KEYS, ARGV[1])
if refused then
  return refused
end
local old
old, refused = checked(KEYS, 5, 'hash', 'HGET', KEYS[5], 'deployed_at')
if refused then
  return refused
end
local counter
counter, refused = route_counter(KEYS, 4)
if refused then
  return refused
end
refused = not_of_type(KEYS, 3, 'hash')
if refused then
  return refused
end
-- The first write also checks the index's type.
local _
_, refused = checked(KEYS, 2, 'zset', 'ZADD', KEYS[2], 0, ARGV[4] .. ' ' .. ARGV[3])
if refused then
  return refused
end

if old and old ~= ARGV[4] then
  redis.call('ZREM', KEYS[2], old .. ' ' .. ARGV[3])
end
if not format then
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[5], 'archive', ARGV[5], 'deployed_at', ARGV[4])
local types = {}
for i = 7, #ARGV do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[6])
  types[#types + 1] = ARGV[i]
end
-- The counter and the message are written with the routes, so a cache that holds
-- version N holds exactly the table the server held at N.
local version = next_route_version(KEYS[4], counter)
announce_routes(ARGV[2], version, ARGV[6], types)
return version
