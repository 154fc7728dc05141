--[[
  Layout 2, a small archive: store one package whose archive stays inside its row (with
  its digest and size, so a read verifies it as it verifies a blob), and re-point routes
  at it, in one atomic step; announce the route change to every route cache of the
  namespace. A small archive takes one round trip to read where a blob takes two, and
  adds little to the namespace's node (kvstore/redis/store.py: INLINE_LIMIT).

  KEYS[1]  {ns}:format    layout marker (string)
  KEYS[2]  {ns}:packages  index (zset, score 0, member "<stamp> <row id>")
  KEYS[3]  {ns}:routes    routes (hash, type -> content hash)
  KEYS[4]  {ns}:route-version  version of the routes table (counter; see
           next_route_version in lua/library.lua)
  KEYS[5]  {ns}:pkg:<row id>  the package row (hash): gets deployed_at, archive, digest
           and size

  ARGV[1]  layout version the caller writes: "2"
  ARGV[2]  {ns}:route-changes, the channel the change is published on
  ARGV[3]  row id, "<type>\0<hash>"
  ARGV[4]  deployed_at stamp, 27 bytes
  ARGV[5]  the archive's digest: SHA-256, 64 lowercase hex digits
  ARGV[6]  the archive's size in bytes, decimal
  ARGV[7]  content hash the routes point at
  ARGV[8]  archive bytes (whose SHA-256 is ARGV[5]: the caller computed it)
  ARGV[9..] workflow types whose routes are re-pointed (at least one)

  Publishes on ARGV[2], after every write, the route change (announce_routes in
  lua/library.lua): the new value of KEYS[4], ARGV[7], and ARGV[9..].

  Checks first (check_call in lua/library.lua) that KEYS are these five of one
  namespace, {ns} being KEYS[1]'s, KEYS[5] the row of ARGV[3], that ARGV holds nine or
  more, that ARGV[2] is that namespace's channel and ARGV[5] a digest.

  Reply:
    version  the routes table's new version (an integer)
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {
  keys = {'format', 'packages', 'routes', 'route-version', ROW}, row = 3, digest = 5,
  args = 9, more = true, channel = 2,
})
if refused then
  return refused
end
return store_package(
  KEYS, ARGV, {'archive', ARGV[8], 'digest', ARGV[5], 'size', ARGV[6]}, {}, 7, 9)
