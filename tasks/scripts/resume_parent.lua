-- Shared by append.lua and resume.lua (tasks/lua.py puts it before each): a parent waiting
-- for its children (tasks/children.py) leaves its arq queue entry in its counts hash: '#resume'
-- (arq's payload in hex, as the hash is read as text), '#entry' (the entry's id) and
-- '#expire_ms'. The end that makes it ready writes it: every child has ended, or more have failed
-- (or been cancelled) than the parent tolerates. Taken with HDEL, so it is written once.
--
-- The entry's keys are the caller's, declared in KEYS: `job_key` is arq's key of `entry`, `queue`
-- arq's queue, `wakeups` the idle workers' channel. The hash names the entry it holds; one that is
-- not `entry` is not written (its key was not declared) and is answered, for the caller to call
-- again with its keys. On a cluster (`queue` false) arq's queue is on another server: `job_key`
-- is then the partition's queue outbox, and the entry's commands are written there as
-- tasks/planes.py reads them (field 'resume <entry>'), with the names the hash keeps for it.
-- Returns 'none' (no entry waits), 'waiting' (not ready yet), 'written', or 'other', entry.
local function resume_parent(counts, job_key, queue, wakeups, entry)
  local r = redis.call('HMGET', counts, '#resume', '#entry', '#expire_ms', '#size', '#done',
    '#failed', '#cancelled', '#max_failures')
  if not r[1] then return 'none' end
  if r[2] ~= entry then return 'other', r[2] end
  if tonumber(r[5] or 0) >= tonumber(r[4] or 0)
      or (r[8] and tonumber(r[6] or 0) + tonumber(r[7] or 0) > tonumber(r[8])) then
    redis.call('HDEL', counts, '#resume')
    local now = redis.call('TIME')
    local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
    if not queue then
      local names = redis.call('HMGET', counts, '#job_key', '#queue', '#wakeups')
      redis.call('HSET', job_key, 'resume ' .. entry, cjson.encode({at = now_ms, commands = {
        {'PSETEX', {names[1]}, {tonumber(r[3]), {x = r[1]}}, true},
        {'ZADD', {names[2]}, {now_ms, entry}, true},
        {'PUBLISH', {names[3]}, {entry}, true}}}))
      return 'written'
    end
    local payload = string.gsub(r[1], '..', function(h) return string.char(tonumber(h, 16)) end)
    redis.call('PSETEX', job_key, r[3], payload)
    redis.call('ZADD', queue, now_ms, entry)
    redis.call('PUBLISH', wakeups, entry)
    return 'written'
  end
  return 'waiting'
end
