--[[
  Layout 2 on a cluster, the second step of a put: store the package row that refers to
  a blob already written (put_blob-1.lua, on the blob's own node), and re-point routes at
  it, in one atomic step; announce the route change to every route cache of the
  namespace. A reader never finds the row before its blob; a put that fails between the
  two steps leaves only a blob no row refers to, which `kvstore gc` collects.

  KEYS[1]  {ns}:format    layout marker (string)
  KEYS[2]  {ns}:packages  index (zset, score 0, member "<stamp> <row id>")
  KEYS[3]  {ns}:routes    routes (hash, type -> content hash)
  KEYS[4]  {ns}:route-version  version of the routes table (counter; see
           next_route_version in lua/library.lua)
  KEYS[5]  {ns}:pkg:<row id>  the package row (hash): gets deployed_at, digest and
           size, and loses archive if it had one (a row of layout 1 put again)

  ARGV[1]  layout version the caller writes: "2" (archives as blobs)
  ARGV[2]  {ns}:route-changes, the channel the change is published on
  ARGV[3]  row id, "<type>\0<hash>"
  ARGV[4]  deployed_at stamp, 27 bytes
  ARGV[5]  the archive's digest: SHA-256, 64 lowercase hex digits
  ARGV[6]  the archive's size in bytes, decimal
  ARGV[7]  content hash the routes point at
  ARGV[8..] workflow types whose routes are re-pointed (at least one)

  Publishes on ARGV[2], after every write, the route change (announce_routes in
  lua/library.lua): the new value of KEYS[4], ARGV[7], and ARGV[8..].

  Checks first (check_call in lua/library.lua) that KEYS are these five of one
  namespace, {ns} being KEYS[1]'s, KEYS[5] the row of ARGV[3], that ARGV holds eight or
  more, that ARGV[2] is that namespace's channel and ARGV[5] a digest.

  Reply:
    version  the routes table's new version (an integer)
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the namespace holds another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {
  keys = {'format', 'packages', 'routes', 'route-version', ROW}, row = 3, digest = 5,
  args = 8, more = true, channel = 2,
})
if refused then
  return refused
end
return store_package(KEYS, ARGV, {'digest', ARGV[5], 'size', ARGV[6]}, {'archive'}, 7, 8)
