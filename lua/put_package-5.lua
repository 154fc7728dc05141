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
  KEYS[5]  {ns}:pkg:<row id>  the package row (hash): gets archive and deployed_at,
           and loses digest and size if it had them

  ARGV[1]  layout version the caller writes: "1" (archives inside rows)
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
return store_package(KEYS, ARGV, {'archive', ARGV[5]}, {'digest', 'size'}, 6, 7)
