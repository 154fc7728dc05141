--[[
  Layout 2 on a cluster, the first step of a put: store one archive as the blob named by
  its digest, on the blob's own node (put_package_digest-5.lua then writes the row). The
  same digest names the same bytes, so writing a blob that exists writes it again: a
  damaged copy is mended, and its `written` stamp renewed, so `kvstore gc` spares it for
  its grace period while the put goes on to write the row.

  KEYS[1]  ns/blob/{<digest>}  the archive's blob (hash: archive, written)

  ARGV[1]  the archive's digest: SHA-256, 64 lowercase hex digits
  ARGV[2]  archive bytes (whose SHA-256 is ARGV[1]: the caller computed it)

  Checks first that KEYS[1] is the blob key of ARGV[1] in a namespace (1 to 64 of
  A-Z a-z 0-9 _ . : -) and that ARGV holds these two.

  Reply:
    1  the blob is written
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE 1 <found> hash"  KEYS[1] holds another type; nothing written
]]
local refused = check_blob_call(KEYS, ARGV, 2)
if refused then
  return refused
end
refused = not_of_type(KEYS, 1, 'hash')
if refused then
  return refused
end
write_blob(KEYS[1], ARGV[2])
return 1
