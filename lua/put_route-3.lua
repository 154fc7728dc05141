--[[
  Point one workflow type's route at a content hash; no archive is touched. The change
  is announced to every route cache of the namespace.

  KEYS[1]  {ns}:format    layout marker (string)
  KEYS[2]  {ns}:routes    routes (hash, type -> content hash)
  KEYS[3]  {ns}:route-version  version of the routes table (counter; see
           next_route_version in lua/library.lua: made anew, it starts at the server's
           clock in microseconds)

  ARGV[1]  layout version the caller writes
  ARGV[2]  {ns}:route-changes, the channel the change is published on
  ARGV[3]  workflow type
  ARGV[4]  content hash

  Publishes on ARGV[2], after the write, the route change (announce_routes in
  lua/library.lua): the new value of KEYS[3], ARGV[4], and ARGV[3].

  Checks first (check_call in lua/library.lua) that KEYS are these three of one
  namespace, {ns} being KEYS[1]'s, that ARGV holds these four and that ARGV[2] is that
  namespace's channel.

  Reply:
    version  the routes table's new version (an integer; one, so replies parse fast)
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {
  keys = {'format', 'routes', 'route-version'}, args = 4, channel = 2,
})
if refused then
  return refused
end
local format
format, refused = layout(KEYS, ARGV[1])
if refused then
  return refused
end
local counter
counter, refused = route_counter(KEYS, 3)
if refused then
  return refused
end
-- The first write also checks the routes' type.
local _
_, refused = checked(KEYS, 2, 'hash', 'HSET', KEYS[2], ARGV[3], ARGV[4])
if refused then
  return refused
end

if not format then
  redis.call('SET', KEYS[1], ARGV[1])
end
-- Counter and message go with the write, so a cache at version N holds the table at N.
local version = next_route_version(KEYS[3], counter)
announce_routes(ARGV[2], version, ARGV[4], {ARGV[3]})
return version
