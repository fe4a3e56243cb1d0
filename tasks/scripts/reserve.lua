-- An owner's places under its limits, on a cluster (tasks/store.py, JobStore.reserve): its
-- submissions in this second and its unfinished jobs live in one partition, the owner's home
-- (Keys.owner_home), whatever partitions its jobs are created in. This takes them in one atomic
-- call before the creates; on one server the append script does it itself.
-- KEYS: 1 the owner's unfinished jobs, 2 its submissions counter of this second (if a.rate).
-- ARGV[1] is the named arguments, a JSON object `a`: limit, take (places to find free under
-- the limit; 0: no check), rate (the submissions-per-second limit, false: none), score (the
-- set's score, microseconds). ARGV[2..]: the ids that take places.
-- Answers {''} or, writing nothing but the submissions counter (every attempt counts, as in
-- append.lua), {'rate', submitted} or {'limit', held}.
local a = cjson.decode(ARGV[1])
if a.rate then
  local submitted = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], 2)
  if submitted > a.rate then return {'rate', submitted} end
end
if a.take > 0 then
  local held = redis.call('ZCARD', KEYS[1])
  if held + a.take > a.limit then return {'limit', held} end
end
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], a.score, ARGV[i]) end
return {''}
