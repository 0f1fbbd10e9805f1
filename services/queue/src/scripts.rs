//! The queue's Lua scripts. Each runs atomically in Redis, and every key it
//! touches is passed in KEYS and shares the queue's hash tag, so they are
//! valid on Redis Cluster.

/// KEYS: jobs, wait, dead. ARGV: id, job JSON.
/// Adds a job unless one with its id is queued, delayed or in flight (returns
/// 0) or dead (returns 2): a dead id comes back only through RETRY_DEAD, an
/// operator's decision, never through a producer re-deriving its work.
pub const ENQUEUE: &str = r#"
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 2 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"#;

/// KEYS: active, jobs, stats. ARGV: id.
/// The job's work committed: forget it, so the id may be used again.
pub const ACK: &str = r#"
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'processed', 1)
return 1
"#;

/// KEYS: active, jobs, delayed, dead, dead_order, stats.
/// ARGV: id, error, now_ms, max_attempts, due_ms, mode — '0' a failed
/// attempt (retried until out of attempts), '1' permanent (dead at once),
/// '2' a dependency was unavailable (retried, no attempt used up: an outage
/// of any length never buries a job).
/// Returns the attempt count when retried later, 0 when the job went to the
/// dead-letter list, -1 when the job was unknown, -2 when deferred (mode 2).
pub const FAIL: &str = r#"
redis.call('LREM', KEYS[1], 1, ARGV[1])
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return -1 end
local job = cjson.decode(raw)
job.last_error = ARGV[2]
redis.call('HINCRBY', KEYS[6], 'failed', 1)
if ARGV[6] == '2' then
  job.outages = (job.outages or 0) + 1
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(job))
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  return -2
end
job.attempts = (job.attempts or 0) + 1
if ARGV[6] == '1' or job.attempts >= tonumber(ARGV[4]) then
  job.failed_at_ms = tonumber(ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], cjson.encode(job))
  redis.call('LREM', KEYS[5], 0, ARGV[1])
  redis.call('LPUSH', KEYS[5], ARGV[1])
  redis.call('HINCRBY', KEYS[6], 'dead', 1)
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(job))
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return job.attempts
"#;

/// KEYS: active, wait. ARGV: id.
/// Hands an unfinished job back (graceful shutdown): next in line, no attempt counted.
pub const RELEASE: &str = r#"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"#;

/// KEYS: delayed, wait. ARGV: now_ms, limit.
/// Moves delayed jobs that are due onto the wait list, at most `limit` of them.
pub const PROMOTE: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('LPUSH', KEYS[2], id)
end
return #ids
"#;

/// KEYS: consumers, active (of the consumer), wait, jobs, dead, dead_order, stats.
/// ARGV: consumer, now_ms, max_attempts.
/// If the consumer's lease has expired, returns every job it held to the front
/// of the wait list and forgets the consumer. A job whose consumer died counts
/// an attempt, so a job that kills every worker that runs it ends up dead
/// rather than cycling forever. Returns how many jobs moved. The loop runs
/// once per id in the list (a consumer's few jobs in flight): nothing else can
/// push to it while the script runs.
pub const REAP: &str = r#"
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) > tonumber(ARGV[2]) then return -1 end
local moved = 0
for _ = 1, redis.call('LLEN', KEYS[2]) do
  local id = redis.call('LPOP', KEYS[2])
  if not id then break end
  moved = moved + 1
  local raw = redis.call('HGET', KEYS[4], id)
  if raw then
    local job = cjson.decode(raw)
    job.attempts = (job.attempts or 0) + 1
    job.last_error = 'its consumer died while running it'
    if job.attempts >= tonumber(ARGV[3]) then
      job.failed_at_ms = tonumber(ARGV[2])
      redis.call('HDEL', KEYS[4], id)
      redis.call('HSET', KEYS[5], id, cjson.encode(job))
      redis.call('LREM', KEYS[6], 0, id)
      redis.call('LPUSH', KEYS[6], id)
      redis.call('HINCRBY', KEYS[7], 'dead', 1)
    else
      redis.call('HSET', KEYS[4], id, cjson.encode(job))
      redis.call('RPUSH', KEYS[3], id)
    end
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
return moved
"#;

/// KEYS: consumers, active (of the consumer), wait, jobs. ARGV: consumer, limit.
/// Returns the jobs in the active list of a consumer that holds no lease at
/// all to the front of the wait list: such a list is left by a BLMOVE that
/// landed after its consumer left. No attempt is counted: a consumer takes its
/// lease before its first fetch, so no live consumer ever ran these jobs.
/// Returns -1, touching nothing, if the consumer holds a lease, even an
/// expired one: those go through REAP. Moves at most `limit` ids (the rest wait
/// for the next sweep); an id without a job is dropped, as a fetch drops it.
/// Returns how many moved.
pub const SWEEP: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return -1 end
local moved = 0
for _ = 1, tonumber(ARGV[2]) do
  local id = redis.call('LPOP', KEYS[2])
  if not id then break end
  if redis.call('HEXISTS', KEYS[4], id) == 1 then
    redis.call('RPUSH', KEYS[3], id)
    moved = moved + 1
  end
end
return moved
"#;

/// KEYS: jobs, wait, dead, dead_order. ARGV: id.
/// Puts a dead job back on the queue with a fresh attempt budget. If a live
/// job with the same id exists meanwhile, the dead one is simply dropped.
pub const RETRY_DEAD: &str = r#"
redis.call('LREM', KEYS[4], 0, ARGV[1])
local raw = redis.call('HGET', KEYS[3], ARGV[1])
if not raw then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
local job = cjson.decode(raw)
job.attempts = 0
job.outages = 0
job.failed_at_ms = nil
if redis.call('HSETNX', KEYS[1], ARGV[1], cjson.encode(job)) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
return 1
"#;
