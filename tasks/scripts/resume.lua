-- Writes a waiting parent's queue entry if it is ready already (tasks/children.py,
-- resume_if_ready): its last child ended between the parent's join and its waiting, and so
-- found no entry to write. resume_parent (resume_parent.lua) comes before this.
-- KEYS: the parent's counts hash, arq's key of the entry, arq's queue, the wake-ups channel.
-- ARGV[1]: the entry's id, as the caller read it from the hash.
-- Returns {outcome, the entry the hash holds when it is another (see resume_parent), or ''}.
local outcome, other = resume_parent(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1])
return {outcome, other or ''}
