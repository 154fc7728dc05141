--[[
  The first step of `kvstore migrate`: the namespace's layout marker goes from "1" to
  "2", atomically. From then on every engine of a release that reads layout 2 writes
  layout 2 (its next write is refused with KVSTORE_FORMAT 2 and sent again in layout
  2), engines of older releases refuse the namespace (their check replies
  KVSTORE_FORMAT 2), and no write leaves an archive inside a row any more: a row found
  holding one was written before this step, and migrate_row-2.lua moves it.

  KEYS[1]  {ns}:format  layout marker (string)

  ARGV[1]  the layout the marker must say: "1"
  ARGV[2]  the layout it is to say: "2" (the only change of layout there is)

  Checks first (check_call in lua/library.lua) that KEYS[1] is a layout marker
  {ns}:format, that ARGV holds these two, and that they are "1" and "2".

  Reply:
    1   the marker said ARGV[1] and now says ARGV[2]
    0   it said ARGV[2] already: nothing written (a migration resumed)
    -1  there is no marker (nothing was ever written to the namespace, or the marker
        was removed): nothing written
    error "KVSTORE_ARGS <argument> <why>"  the call is not of this shape; nothing written
    error "KVSTORE_TYPE 1 <found> string"  KEYS[1] holds another type; nothing written
    error "KVSTORE_FORMAT <found>"  the marker says another layout; nothing written
]]
local refused = check_call(KEYS, ARGV, {keys = {'format'}, args = 2})
if refused then
  return refused
end
if ARGV[1] ~= '1' then
  return misuse('ARGV[1]', 'is not "1", the layout a migration starts from')
end
if ARGV[2] ~= '2' then
  return misuse('ARGV[2]', 'is not "2", the layout a migration goes to')
end
local found
found, refused = checked(KEYS, 1, 'string', 'GET', KEYS[1])
if refused then
  return refused
end
if not found then
  return -1
end
if found == ARGV[2] then
  return 0
end
if found ~= ARGV[1] then
  return redis.error_reply('KVSTORE_FORMAT ' .. found)
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
