--[[
  `kvstore migrate`, one row: a row of layout 1 (its archive inside it, no digest)
  becomes a row of layout 2, atomically, if it is still the row the caller read: a large
  archive moves to its blob (which the caller has written first, with put_blob-1.lua),
  and the row keeps its digest and size; a small one stays inside the row, which gets
  its digest and size, as a put of layout 2 would write it. Once the marker says "2"
  (set_layout-1.lua) no write leaves an archive without a digest inside a row, so a row
  that still holds one at the stamp the caller read it with is unchanged since; one
  deleted or put again since is left as it is, and the reply says which.

  KEYS[1]  {ns}:format  layout marker (string): must say "2"
  KEYS[2]  {ns}:pkg:<row id>  the package row (hash): gets digest and size, and loses
           archive when ARGV[6] is "blob"; deployed_at and the row's index member are
           unchanged

  ARGV[1]  the layout the caller migrates to: "2"
  ARGV[2]  row id, "<type>\0<hash>"
  ARGV[3]  the deployed_at stamp the caller read with the archive, 27 bytes
  ARGV[4]  the archive's digest: SHA-256, 64 lowercase hex digits (its blob is written)
  ARGV[5]  the archive's size in bytes, decimal
  ARGV[6]  where the archive goes: "blob" (its blob is written) or "inline" (it stays)

  Checks first (check_call in lua/library.lua) that KEYS are these two of one
  namespace, {ns} being KEYS[1]'s, KEYS[2] the row of ARGV[2], that ARGV holds these
  six, ARGV[1] is "2", ARGV[4] a digest, ARGV[5] a decimal size and ARGV[6] "blob" or
  "inline"; then that the marker says "2", and that ARGV[5] is the length of the
  archive the row holds.

  Reply:
    1   the row was migrated
    0   there is no such row (deleted since it was read): nothing written
    2   the row holds no archive, or holds a digest (put again in layout 2 since, or
        migrated by another run): nothing written
    3   the row's deployed_at is not ARGV[3] (put again since): nothing written
    -1  there is no marker (removed since the migration set it): nothing written
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape, or ARGV[5] is
        not the length of the row's archive; nothing written
    error "KVSTORE_TYPE <i> <found> <expected>"  KEYS[i] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the marker says another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {keys = {'format', ROW}, row = 2, digest = 4, args = 6})
if refused then
  return refused
end
if ARGV[1] ~= '2' then
  return misuse('ARGV[1]', 'is not "2", the layout a migration goes to')
end
if not string.match(ARGV[5], '^%d+$') or #ARGV[5] > 20 then
  return misuse('ARGV[5]', 'is not a size in bytes')
end
if ARGV[6] ~= 'blob' and ARGV[6] ~= 'inline' then
  return misuse('ARGV[6]', 'is not "blob" or "inline"')
end
local format
format, refused = layout(KEYS, ARGV[1])
if refused then
  return refused
end
if not format then
  return -1
end
local stamp
stamp, refused = checked(KEYS, 2, 'hash', 'HGET', KEYS[2], 'deployed_at')
if refused then
  return refused
end
-- Sized, not read: an archive is never copied into the script's memory.
local size = redis.call('HSTRLEN', KEYS[2], 'archive')
if size == 0 and redis.call('HEXISTS', KEYS[2], 'archive') == 0 then
  return redis.call('EXISTS', KEYS[2]) == 1 and 2 or 0
end
if redis.call('HEXISTS', KEYS[2], 'digest') == 1 then
  return 2
end
if stamp ~= ARGV[3] then
  return 3
end
if string.format('%d', size) ~= ARGV[5] then
  return misuse('ARGV[5]', 'is not the length of the row\'s archive, '
    .. string.format('%d', size))
end
if ARGV[6] == 'blob' then
  redis.call('HDEL', KEYS[2], 'archive')
end
redis.call('HSET', KEYS[2], 'digest', ARGV[4], 'size', ARGV[5])
return 1
