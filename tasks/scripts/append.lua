-- The one atomic append of a job's events (tasks/store.py, JobStore): adds the events to the
-- job's stream and to the firehose, publishes them, applies the record's fields, refreshes the
-- expiry, and with them takes the owner's unfinished-jobs places, counts the transition, counts a
-- batch child's end into its batch (and writes its waiting parent's queue entry), adds the
-- webhook outbox entries and runs the caller's ride-along commands. A precondition on the record
-- makes it a compare-and-set. resume_parent (resume_parent.lua) comes before this.
--
-- Every key it touches is declared in KEYS, in this order, and no key name is built here or read
-- from data (a channel counts as a key: on a cluster a job's channel is a sharded one). That is
-- what makes the keys checkable: by ACLs, and on a cluster, where every key of one call must
-- share a hash slot (the next step: hash tags), by Redis itself.
--   1 record, 2 job stream, 3 firehose, 4 cancel flag, 5 job index, 6 the owner's unfinished
--   jobs, 7 webhook outbox, 8 webhook events dropped, 9 the job's channel, 10 the firehose's
--   channel; then
--   for each transition this append makes (a.counted, tasks/transitions.py): its counter and its
--     window's counter;
--   if a.requires: a record that must exist (a batch's parent, for its children: created in the
--     same MULTI only if it was admitted);
--   if a.batch: the batch's counts hash and ended list (a child that ends is counted there);
--   if a.entry: arq's key of the waiting parent's entry, arq's queue, the wake-ups channel (on a
--     cluster, a.outboxed: the partition's queue outbox instead, resume_parent.lua);
--   if a.rate: the owner's submissions counter of this second;
--   then the keys of each ride-along command, in order.
-- ARGV[1] is the named arguments, a JSON object `a`:
--   events, fields: how many events follow, and how many field/value pairs after them;
--   commands: the ride-along commands, each [name, its number of keys, its number of arguments];
--   job_maxlen, firehose_maxlen, outbox_maxlen: the streams' lengths;
--   ttl: how long the record and its log live from now (s); window_ttl: a window counter's;
--   mode: "create" (the record must not exist), "update" (it must), "update+cancel" (and no
--     cancel was requested);
--   expect: the states the record may be in (",<json state>,...," or "": any);
--   owner: the owner as JSON text; id: the job's id; score: its score in the job index (on a
--     create) and in the unfinished set (now unless a scheduled job's run_at, microseconds);
--   webhook_states: the states the deployment webhook wants (as expect; "": none);
--   limit, take: the owner's unfinished-jobs limit, and the places this append needs under it
--     (0: no check);
--   counted, requires, batch, entry: which of the optional keys above are declared (batch: the
--     batch's (or parent's) id; entry: the id of the parent's queue entry; false: none);
--   rate: the owner's submissions-per-second limit, for a submission counted in this call
--     (false: none).
-- After it, as they are: the events (JSON), then the field/value pairs (each value JSON), then
-- the ride-along commands' arguments. They stay out of the table: the events and values are
-- spliced into the stream entries and messages as they are (decoded and encoded again by cjson,
-- they would cost more and could change), and a command's arguments may be binary (arq's
-- pickled payload), which JSON cannot carry.
--
-- Refusals write nothing (but the submissions counter, which counts every attempt) and answer
-- {"", why}: {"", "rate", submitted} past the owner's submissions per second, the record's
-- state, "exists", "missing", "cancel", "orphan" (the required record is missing),
-- {"", "limit", unfinished} when the places
-- asked for do not fit under the limit, or {"", "keys", batch, entry} when an end must be counted
-- into a batch (or write a parent's entry) whose keys the caller did not declare: the caller
-- calls again with them. The caller knows them in all but rare cases (a parent that began to wait
-- meanwhile): a record's batch never changes, and the entry is read from the hash here.
-- A terminal state adds one outbox entry per webhook that wants it (the record's callback_url,
-- the deployment webhook): {job, event (this append's last event id), target, record (the record
-- as JSON, as it is now)}. In the same script, so a process dying after the append cannot lose
-- the delivery (tasks/outbox.py delivers it). A full outbox (outbox_maxlen entries, all
-- undelivered) takes no more: the drop is counted, and a worker logs it.
-- The transitions are counted by the record's task once every precondition has passed, so a
-- refused append counts nothing; and a batch's child that ends is counted into its batch
-- (tasks/batches.py) in the same call that writes its end, so no end can be lost to its batch.
local a = cjson.decode(ARGV[1])
local first_field = 2 + a.events
local last_field = first_field + 2 * a.fields - 1

local record, log, firehose, cancel_flag, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local unfinished, outbox, dropped = KEYS[6], KEYS[7], KEYS[8]
local job_channel, firehose_channel = KEYS[9], KEYS[10]
local next_key = 11
local first_counter = next_key
next_key = next_key + 2 * a.counted
local required
if a.requires then
  required = KEYS[next_key]
  next_key = next_key + 1
end
local counts, ended
if a.batch then
  counts, ended = KEYS[next_key], KEYS[next_key + 1]
  next_key = next_key + 2
end
local entry_key, queue, wakeups
if a.entry and a.outboxed then
  entry_key = KEYS[next_key]  -- a cluster's: the partition's queue outbox (resume_parent.lua)
  next_key = next_key + 1
elseif a.entry then
  entry_key, queue, wakeups = KEYS[next_key], KEYS[next_key + 1], KEYS[next_key + 2]
  next_key = next_key + 3
end
local rate_counter
if a.rate then
  rate_counter = KEYS[next_key]
  next_key = next_key + 1
end
local mode = a.mode

local function field(name)
  for i = first_field, last_field - 1, 2 do
    if ARGV[i] == name then return ARGV[i + 1] end
  end
  return nil
end

-- The call's mark (a random token among the fields, stored on the record): a call whose reply
-- was lost with its connection is sent again by the client, and finds its own mark. It answers
-- as the first did instead of appending its events twice. A create keeps its mark apart too
-- (create_op): a worker's appends replace append_op, and a create sent again after them (a
-- batch's MULTI, re-sent after a Valkey restart) must still find its own.
local create_op
local op = field('append_op')
if op then
  local mark = mode == 'create' and 'create_op' or 'append_op'
  if redis.call('HGET', record, mark) == op then
    local last = redis.call('HGET', record, 'last_event_id')
    return {string.sub(last, 2, -2), ''}
  end
  if mode == 'create' then create_op = op end
end
-- Every attempt counts in its second, the refused ones too: a client that keeps sending past
-- the limit keeps being refused until the second is over.
if rate_counter then
  local submitted = redis.call('INCR', rate_counter)
  redis.call('EXPIRE', rate_counter, 2)
  if submitted > a.rate then return {'', 'rate', submitted} end
end
local state = redis.call('HGET', record, 'state')
if mode == 'create' then
  if state then return {'', 'exists'} end
else
  if not state then return {'', 'missing'} end
  if a.expect ~= '' and not string.find(a.expect, ',' .. state .. ',', 1, true) then
    return {'', state}
  end
  if mode == 'update+cancel' and redis.call('EXISTS', cancel_flag) == 1 then
    return {'', 'cancel'}
  end
end
if required and redis.call('EXISTS', required) == 0 then return {'', 'orphan'} end
local new_state = field('state')
local terminal = (new_state == '"completed"' or new_state == '"failed"'
  or new_state == '"cancelled"') and new_state
-- The batch an end is counted into: the record's batch_id, or a job's child's parent
-- (tasks/children.py), counted the same way into the same keys. Its keys must be the declared
-- ones, checked before anything is written.
local batch = false
if terminal then
  local function stored(name)
    local value = field(name)
    if value == nil and mode ~= 'create' then value = redis.call('HGET', record, name) end
    if value and value ~= 'null' then return cjson.decode(value) end
    return false
  end
  batch = stored('batch_id') or stored('parent')
  if batch ~= a.batch then return {'', 'keys', batch or '', ''} end
  if batch then
    local held = redis.call('HMGET', counts, '#resume', '#entry')
    if held[1] and held[2] ~= a.entry then return {'', 'keys', batch, held[2] or ''} end
  end
end
-- Counted and taken in the script that writes what they admit: nothing comes between. Ids whose
-- record has expired are dropped by the caller (JobStore) when they refuse, in calls of their
-- own: their records' keys are known only from the set's members, and a record that has expired
-- never comes back, so dropping its id needs no atomicity with this check.
if a.take > 0 then
  local held = redis.call('ZCARD', unfinished)
  if held + a.take > a.limit then return {'', 'limit', held} end
end
-- The job's subject (JSON), from the fields being written (create) or the record, so that
-- firehose entries and wake-ups carry it like the owner: the firehose filters on both.
local subject = false
if mode == 'create' then
  subject = field('subject') or false
else
  subject = redis.call('HGET', record, 'subject')
end
if subject == 'null' then subject = false end
local jid, fid
for e = 2, first_field - 1 do
  jid = redis.call('XADD', log, 'MAXLEN', '~', a.job_maxlen, '*', 'e', ARGV[e])
  if subject then
    fid = redis.call('XADD', firehose, 'MAXLEN', '~', a.firehose_maxlen, '*',
      'i', jid, 'o', a.owner, 's', subject, 'e', ARGV[e])
  else
    fid = redis.call('XADD', firehose, 'MAXLEN', '~', a.firehose_maxlen, '*',
      'i', jid, 'o', a.owner, 'e', ARGV[e])
  end
  -- On the job's channel for its viewers, and on the firehose's for the firehose's: a web
  -- process subscribes to each only while it has such viewers (server/hub.py), and a publish
  -- that no one hears costs Valkey little. Sharded (SPUBLISH): on a cluster it reaches the
  -- subscribers of this slot's primary only, where PUBLISH would go to every node.
  local message = '{"job_event_id":"' .. jid .. '","firehose_id":"' .. fid ..
    '","owner":' .. a.owner .. (subject and (',"subject":' .. subject) or '') ..
    ',"event":' .. ARGV[e] .. '}'
  redis.call('SPUBLISH', job_channel, message)
  redis.call('SPUBLISH', firehose_channel, message)
end
if new_state == '"queued"' or new_state == '"scheduled"' then
  redis.call('ZADD', unfinished, a.score, a.id)
elseif terminal then
  redis.call('ZREM', unfinished, a.id)
end
if last_field >= first_field then
  redis.call('HSET', record, unpack(ARGV, first_field, last_field))
end
if mode == 'create' then
  redis.call('ZADD', index, a.score, a.id)
  if create_op then redis.call('HSET', record, 'create_op', create_op) end
end
redis.call('HSET', record, 'last_event_id', '"' .. jid .. '"')
redis.call('EXPIRE', record, a.ttl)
redis.call('EXPIRE', log, a.ttl)
if terminal then
  local targets = {}
  local callback = redis.call('HGET', record, 'callback_url')
  if callback and callback ~= 'null' then targets[#targets + 1] = 'callback' end
  if string.find(a.webhook_states, ',' .. terminal .. ',', 1, true) then
    targets[#targets + 1] = 'deployment'
  end
  if #targets > 0 then
    -- Every value in the hash is JSON already, every name a field name.
    local flat = redis.call('HGETALL', record)
    local parts = {}
    for f = 1, #flat, 2 do parts[#parts + 1] = '"' .. flat[f] .. '":' .. flat[f + 1] end
    local whole = '{' .. table.concat(parts, ',') .. '}'
    for _, target in ipairs(targets) do
      if redis.call('XLEN', outbox) < a.outbox_maxlen then
        redis.call('XADD', outbox, '*', 'job', a.id, 'event', jid, 'target', target,
          'record', whole)
      else
        redis.call('INCR', dropped)
      end
    end
  end
end
local task = a.counted > 0 and redis.call('HGET', record, 'task')
if task then
  task = cjson.decode(task)
  for c = first_counter, first_counter + 2 * a.counted - 1, 2 do
    redis.call('HINCRBY', KEYS[c], task, 1)
    redis.call('HINCRBY', KEYS[c + 1], task, 1)
    redis.call('EXPIRE', KEYS[c + 1], a.window_ttl)
  end
end
if batch then
  -- Each child counted once, by its outcome: ended again (retried by hand, then ended), it
  -- moves from the one to the other. The ended list keeps the order the parent shows them in.
  local outcome = string.sub(terminal, 2, -2)
  local prev = redis.call('HGET', counts, a.id)
  if prev ~= outcome then
    if prev then
      redis.call('HINCRBY', counts, '#' .. prev, -1)
    else
      redis.call('HINCRBY', counts, '#done', 1)
      -- What the child spent, summed for its parent (a child of a job: tasks/rollup.py).
      local cost = tonumber(redis.call('HGET', record, 'cost') or '0') or 0
      if cost > 0 then redis.call('HINCRBYFLOAT', counts, '#cost', cost) end
      local usage = redis.call('HGET', record, 'usage')
      if usage then
        usage = cjson.decode(usage)
        for _, name in ipairs({'calls', 'input_tokens', 'output_tokens'}) do
          local n = tonumber(usage[name]) or 0
          if n > 0 then redis.call('HINCRBY', counts, '#' .. name, n) end
        end
      end
    end
    redis.call('HSET', counts, a.id, outcome)
    redis.call('HINCRBY', counts, '#' .. outcome, 1)
    redis.call('RPUSH', ended, a.id .. ' ' .. outcome .. ' ' .. (prev or ''))
  end
  redis.call('EXPIRE', counts, a.ttl)
  redis.call('EXPIRE', ended, a.ttl)
  if entry_key then resume_parent(counts, entry_key, queue, wakeups, a.entry) end
end
-- The ride-along commands: each takes its keys from KEYS and its other arguments from ARGV.
local key, arg = next_key, last_field + 1
for _, command in ipairs(a.commands) do
  local call = {command[1]}
  for _ = 1, command[2] do
    call[#call + 1] = KEYS[key]
    key = key + 1
  end
  for _ = 1, command[3] do
    call[#call + 1] = ARGV[arg]
    arg = arg + 1
  end
  redis.call(unpack(call))
end
return {jid, fid}
