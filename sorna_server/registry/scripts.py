"""The registry's server-side Lua scripts.

Each script runs atomically in the one Redis database it is called on, so every
key a script touches lives in that database (see `sorna_server.redis_keys`).
Scripts are called by SHA (EVALSHA) and loaded on first use or after a Redis
restart (NOSCRIPT).  Key names are built inside the scripts from the prefixes
of `redis_keys`, which is fine for a single Redis server (Sorna needs several
logical databases, which Redis Cluster does not offer anyway).

Instances database
------------------
`recompute(iid, now)` (a Lua helper shared by the instance scripts) derives an
instance's load — kernels in its kernel set plus unexpired slot reservations —
and puts the instance into exactly the scheduling sets it belongs to:
`sched:live`, `sched:draining`, and per language `sched:offer:<lang>`,
`sched:open:<lang>` and the candidate sorted set `sched:free:<lang>` (scored by
load / max_kernels).  Because the load is derived from set sizes rather than
counted up and down, every script that changes a set may simply call it again:
removing a kernel twice cannot free two slots.
"""
from __future__ import annotations

import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from .. import redis_keys as keys

_PRELUDE = f"""
local P_INSTANCE = {keys.INSTANCE_PREFIX!r}
local S_KERNELS = {keys.INSTANCE_KERNELS_SUFFIX!r}
local S_RESERVED = {keys.INSTANCE_RESERVED_SUFFIX!r}
local S_ALIVE = {keys.INSTANCE_ALIVE_SUFFIX!r}
local S_MISSING = {keys.INSTANCE_MISSING_SUFFIX!r}
local S_UNKNOWN = {keys.INSTANCE_UNKNOWN_SUFFIX!r}
local S_SUSPECT = {keys.INSTANCE_SUSPECT_SUFFIX!r}
local K_INSTANCES = {keys.INSTANCES!r}
local K_AGENT_KEYS = {keys.AGENT_KEYS!r}
local K_AGENT_ADDRS = {keys.AGENT_ADDRS!r}
local K_LIVE = {keys.SCHED_LIVE!r}
local K_DRAINING = {keys.SCHED_DRAINING!r}
local P_OFFER = {keys.SCHED_OFFER_PREFIX!r}
local P_OPEN = {keys.SCHED_OPEN_PREFIX!r}
local P_FREE = {keys.SCHED_FREE_PREFIX!r}

local function decode_list(text)
  if not text or text == '' then return {{}} end
  local ok, value = pcall(cjson.decode, text)
  if ok and type(value) == 'table' then return value end
  return {{}}
end

-- An address no instance holds any more: neither its holder nor its key is kept
local function release_addr(addr)
  redis.call('HDEL', K_AGENT_ADDRS, addr)
  redis.call('HDEL', K_AGENT_KEYS, addr)
end

-- Drop an instance from every per-language scheduling set of `langs`.
local function unlist_languages(iid, langs)
  for _, lang in ipairs(langs) do
    redis.call('SREM', P_OFFER .. lang, iid)
    redis.call('SREM', P_OPEN .. lang, iid)
    redis.call('ZREM', P_FREE .. lang, iid)
  end
end

-- Derive the load of `iid` and file it into the scheduling sets; returns the
-- load, or false when the instance is unknown.
local function recompute(iid, now)
  local h = P_INSTANCE .. iid
  local f = redis.call('HMGET', h, 'status', 'draining', 'max_kernels', 'languages')
  local status = f[1]
  if not status then return false end
  local reserved = h .. S_RESERVED
  redis.call('ZREMRANGEBYSCORE', reserved, '-inf', now)
  local load = redis.call('SCARD', h .. S_KERNELS) + redis.call('ZCARD', reserved)
  local maxk = tonumber(f[3]) or 0
  redis.call('HSET', h, 'load', load)
  local langs = decode_list(f[4])
  if status == 'lost' then
    redis.call('SREM', K_LIVE, iid)
    redis.call('SREM', K_DRAINING, iid)
    unlist_languages(iid, langs)
    return load
  end
  local draining = f[2] == '1'
  redis.call('SADD', K_LIVE, iid)
  if draining then redis.call('SADD', K_DRAINING, iid) else redis.call('SREM', K_DRAINING, iid) end
  for _, lang in ipairs(langs) do
    redis.call('SADD', P_OFFER .. lang, iid)
    if draining then
      redis.call('SREM', P_OPEN .. lang, iid)
      redis.call('ZREM', P_FREE .. lang, iid)
    else
      redis.call('SADD', P_OPEN .. lang, iid)
      if load < maxk then
        redis.call('ZADD', P_FREE .. lang, load / maxk, iid)
      else
        redis.call('ZREM', P_FREE .. lang, iid)
      end
    end
  end
  return load
end
"""

# ARGV: lang, now, reservation expiry time, reservation token
SCHEDULE = _PRELUDE + """
local lang, now, expiry, token = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local zkey = P_FREE .. lang
local start, suspects = 0, 0
while true do
  local head = redis.call('ZRANGE', zkey, start, start)
  if #head == 0 then break end
  local iid = head[1]
  local h = P_INSTANCE .. iid
  if redis.call('EXISTS', h .. S_SUSPECT) == 1 then
    -- not answering RPC right now: skip it but keep it a candidate
    start = start + 1
    suspects = suspects + 1
  else
    local alive = redis.call('EXISTS', h .. S_ALIVE) == 1
    local load = alive and recompute(iid, now)
    local f = redis.call('HMGET', h, 'status', 'max_kernels')
    if alive and load and f[1] == 'running' and load < (tonumber(f[2]) or 0) then
      redis.call('ZADD', h .. S_RESERVED, expiry, token)
      recompute(iid, now)
      return {'ok', iid, redis.call('HGETALL', h)}
    end
    -- not a candidate after all (liveness lapsed, or state changed): drop it
    -- from this language's candidates; its next heartbeat files it again.
    redis.call('ZREM', zkey, iid)
  end
end
if redis.call('SCARD', K_LIVE) == 0 then return {'error', 'no-agents'} end
if redis.call('SCARD', P_OFFER .. lang) == 0 then return {'error', 'language-not-offered'} end
if redis.call('SCARD', P_OPEN .. lang) == 0 then return {'error', 'all-draining'} end
if suspects > 0 then return {'error', 'all-unreachable'} end
return {'error', 'all-full'}
"""

# ARGV: instance id, now.  Gives back the oldest reservation.
UNRESERVE = _PRELUDE + """
local iid, now = ARGV[1], tonumber(ARGV[2])
redis.call('ZPOPMIN', P_INSTANCE .. iid .. S_RESERVED, 1)
return recompute(iid, now)
"""

# ARGV: instance id, kernel id, now, consume reservation (1/0).
# Returns 'ok', or the reason the kernel cannot be bound ('unknown', 'lost').
BIND_KERNEL = _PRELUDE + """
local iid, kid, now, consume = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local h = P_INSTANCE .. iid
local status = redis.call('HGET', h, 'status')
if not status then return 'unknown' end
if status == 'lost' then return 'lost' end
local added = redis.call('SADD', h .. S_KERNELS, kid)
if added == 1 and consume then redis.call('ZPOPMIN', h .. S_RESERVED, 1) end
redis.call('HDEL', h .. S_MISSING, kid)
redis.call('HDEL', h .. S_UNKNOWN, kid)
recompute(iid, now)
return 'ok'
"""

# ARGV: instance id, kernel id, now.  Idempotent: returns 1 if it removed it.
FORGET_KERNEL = _PRELUDE + """
local iid, kid, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local h = P_INSTANCE .. iid
local removed = redis.call('SREM', h .. S_KERNELS, kid)
redis.call('HDEL', h .. S_MISSING, kid)
recompute(iid, now)
return removed
"""

# ARGV: instance id, now, liveness TTL ms, interval, missing grace (s), addr,
# max_kernels, num_kernels, languages (JSON), version, cpu_count, mem_bytes,
# isolation (JSON), language_info (JSON), then the kernel ids the agent runs.
# Returns {state, vanished kernel ids, unknown kernel ids}; state is 'new',
# 'ok' or 'lost' (a lost instance is left untouched: the caller revives it).
HEARTBEAT = _PRELUDE + """
local iid, now, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local interval, grace = ARGV[4], tonumber(ARGV[5])
local h = P_INSTANCE .. iid
local status, owner, old_addr = unpack(redis.call('HMGET', h, 'status', 'key', 'addr'))
-- an instance id speaks only through the agent key that registered it
if owner and owner ~= ARGV[15] then return {'foreign', {}, {}} end
-- an address belongs to one live instance: no other id may claim it meanwhile
local addr = ARGV[6]
local holder = redis.call('HGET', K_AGENT_ADDRS, addr)
if holder and holder ~= iid then
  local held = redis.call('HGET', P_INSTANCE .. holder, 'status')
  if held and held ~= 'lost' then return {'taken', {}, {}} end
end
if status == 'lost' then return {'lost', {}, {}} end
local state = 'ok'
if not status then
  state = 'new'
  redis.call('HSET', h, 'status', 'running', 'draining', '0', 'first_heartbeat', ARGV[2])
  redis.call('SADD', K_INSTANCES, iid)
else
  local old = redis.call('HGET', h, 'languages')
  if old and old ~= ARGV[9] then unlist_languages(iid, decode_list(old)) end
end
if old_addr and old_addr ~= addr and redis.call('HGET', K_AGENT_ADDRS, old_addr) == iid then
  release_addr(old_addr)
end
redis.call('HSET', K_AGENT_ADDRS, addr, iid)
redis.call('HSET', K_AGENT_KEYS, addr, ARGV[15])
redis.call('HSET', h, 'last_heartbeat', ARGV[2], 'interval', interval, 'addr', ARGV[6],
           'max_kernels', ARGV[7], 'num_kernels', ARGV[8], 'languages', ARGV[9],
           'version', ARGV[10], 'cpu_count', ARGV[11], 'mem_bytes', ARGV[12],
           'isolation', ARGV[13], 'language_info', ARGV[14], 'key', ARGV[15])
redis.call('SET', h .. S_ALIVE, '1', 'PX', ttl)
recompute(iid, now)

local running = {}
for i = 16, #ARGV do running[ARGV[i]] = true end
local held = {}
local vanished = {}
local mkey, ukey = h .. S_MISSING, h .. S_UNKNOWN
for _, kid in ipairs(redis.call('SMEMBERS', h .. S_KERNELS)) do
  held[kid] = true
  if not running[kid] then
    local since = redis.call('HGET', mkey, kid)
    if not since then
      redis.call('HSET', mkey, kid, ARGV[2])
    elseif now - tonumber(since) >= grace then
      table.insert(vanished, kid)
    end
  end
end
for _, kid in ipairs(redis.call('HKEYS', mkey)) do
  if running[kid] or not held[kid] then redis.call('HDEL', mkey, kid) end
end
local unknown = {}
for i = 16, #ARGV do
  local kid = ARGV[i]
  if not held[kid] then
    local since = redis.call('HGET', ukey, kid)
    if not since then
      redis.call('HSET', ukey, kid, ARGV[2])
    elseif now - tonumber(since) >= grace then
      table.insert(unknown, kid)
    end
  end
end
for _, kid in ipairs(redis.call('HKEYS', ukey)) do
  if held[kid] or not running[kid] then redis.call('HDEL', ukey, kid) end
end
return {state, vanished, unknown}
"""

# ARGV: now.  Marks every instance whose liveness key lapsed as lost and
# returns {instance id, {kernel ids}} for each lost instance still holding
# kernels (so an interrupted sweep is finished by the next one).
SWEEP = _PRELUDE + """
local now = tonumber(ARGV[1])
local out = {}
for _, iid in ipairs(redis.call('SMEMBERS', K_INSTANCES)) do
  local h = P_INSTANCE .. iid
  local status = redis.call('HGET', h, 'status')
  if not status then
    redis.call('SREM', K_INSTANCES, iid)
  else
    if status ~= 'lost' and redis.call('EXISTS', h .. S_ALIVE) == 0 then
      redis.call('HSET', h, 'status', 'lost', 'lost_at', ARGV[1])
      redis.call('DEL', h .. S_RESERVED, h .. S_MISSING, h .. S_UNKNOWN, h .. S_SUSPECT)
      recompute(iid, now)
      status = 'lost'
      table.insert(out, {iid, redis.call('SMEMBERS', h .. S_KERNELS), 'new'})
    elseif status == 'lost' and redis.call('SCARD', h .. S_KERNELS) > 0 then
      table.insert(out, {iid, redis.call('SMEMBERS', h .. S_KERNELS), 'old'})
    end
  end
end
return out
"""

# ARGV: instance id, now, liveness TTL ms.  Brings a lost instance back
# (status running, or draining if it was drained) with no reservations.
REVIVE = _PRELUDE + """
local iid, now = ARGV[1], tonumber(ARGV[2])
local h = P_INSTANCE .. iid
local status = redis.call('HGET', h, 'status')
if not status then return false end
local draining = redis.call('HGET', h, 'draining') == '1'
redis.call('HSET', h, 'status', draining and 'draining' or 'running', 'revived_at', ARGV[2])
redis.call('HDEL', h, 'lost_at')
redis.call('DEL', h .. S_RESERVED, h .. S_MISSING, h .. S_UNKNOWN, h .. S_SUSPECT)
redis.call('SET', h .. S_ALIVE, '1', 'PX', ARGV[3])
recompute(iid, now)
return status
"""

# ARGV: instance id, now, draining (1/0).  Returns the new status or false.
SET_DRAINING = _PRELUDE + """
local iid, now, flag = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local h = P_INSTANCE .. iid
local status = redis.call('HGET', h, 'status')
if not status then return false end
redis.call('HSET', h, 'draining', flag)
if status ~= 'lost' then
  status = flag == '1' and 'draining' or 'running'
  redis.call('HSET', h, 'status', status)
end
recompute(iid, now)
return status
"""

# ARGV: instance id.  Removes every trace of an instance (it shut down).
# Returns the kernel ids it still held.
FORGET_INSTANCE = _PRELUDE + """
local iid = ARGV[1]
local h = P_INSTANCE .. iid
local kernels = redis.call('SMEMBERS', h .. S_KERNELS)
local addr = redis.call('HGET', h, 'addr')
if addr and redis.call('HGET', K_AGENT_ADDRS, addr) == iid then release_addr(addr) end
unlist_languages(iid, decode_list(redis.call('HGET', h, 'languages')))
redis.call('SREM', K_LIVE, iid)
redis.call('SREM', K_DRAINING, iid)
redis.call('SREM', K_INSTANCES, iid)
redis.call('DEL', h, h .. S_KERNELS, h .. S_RESERVED, h .. S_ALIVE, h .. S_MISSING, h .. S_UNKNOWN,
           h .. S_SUSPECT)
return kernels
"""

# --- kernels database --------------------------------------------------------
_KERNEL_PRELUDE = f"local P_KERNEL = {keys.KERNEL_PREFIX!r}\n"

# ARGV: pairs of kernel id, stats JSON.  Only updates kernels that exist.
UPDATE_STATS = _KERNEL_PRELUDE + """
local n = 0
for i = 1, #ARGV, 2 do
  local k = P_KERNEL .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'last_stats', ARGV[i + 1])
    n = n + 1
  end
end
return n
"""

# ARGV: kernel id, now.  Returns the new query count, or 0 if unknown.
TOUCH_KERNEL = _KERNEL_PRELUDE + """
local k = P_KERNEL .. ARGV[1]
if redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, 'last_used', ARGV[2])
return redis.call('HINCRBY', k, 'num_queries', 1)
"""

# ARGV: now, then pairs of kernel id, number of queries.  Batched touch_kernel:
# only kernels that exist are updated; returns how many were.
TOUCH_KERNELS = _KERNEL_PRELUDE + """
local n = 0
for i = 2, #ARGV, 2 do
  local k = P_KERNEL .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'last_used', ARGV[1])
    redis.call('HINCRBY', k, 'num_queries', ARGV[i + 1])
    n = n + 1
  end
end
return n
"""

# ARGV: kernel id, then field/value pairs.  Only updates a kernel that exists.
UPDATE_KERNEL = _KERNEL_PRELUDE + """
local k = P_KERNEL .. ARGV[1]
if redis.call('EXISTS', k) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
return 1
"""

# --- sessions database -------------------------------------------------------
# KEYS: session key; ARGV: kernel id.  Binds if unbound; returns the kernel id
# bound before, or nil when this call bound it.
CLAIM_SESSION = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1])
return false
"""

# KEYS: session key; ARGV: kernel id.  Deletes only if still bound to it.
RELEASE_SESSION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LuaScript:
    """A script called by SHA; loaded into Redis on first use or after NOSCRIPT."""

    def __init__(self, name: str, source: str):
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, client: Redis) -> None:
        await client.script_load(self.source)

    async def __call__(self, client: Redis, *args: Any, keys: tuple[str, ...] = ()) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


def is_noscript(result: Any) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT"))


schedule = LuaScript("schedule", SCHEDULE)
unreserve = LuaScript("unreserve", UNRESERVE)
bind_kernel = LuaScript("bind_kernel", BIND_KERNEL)
forget_kernel = LuaScript("forget_kernel", FORGET_KERNEL)
heartbeat = LuaScript("heartbeat", HEARTBEAT)
sweep = LuaScript("sweep", SWEEP)
revive = LuaScript("revive", REVIVE)
set_draining = LuaScript("set_draining", SET_DRAINING)
forget_instance = LuaScript("forget_instance", FORGET_INSTANCE)
update_stats = LuaScript("update_stats", UPDATE_STATS)
touch_kernel = LuaScript("touch_kernel", TOUCH_KERNEL)
touch_kernels = LuaScript("touch_kernels", TOUCH_KERNELS)
update_kernel = LuaScript("update_kernel", UPDATE_KERNEL)
claim_session = LuaScript("claim_session", CLAIM_SESSION)
release_session = LuaScript("release_session", RELEASE_SESSION)

ALL = (schedule, unreserve, bind_kernel, forget_kernel, heartbeat, sweep, revive, set_draining,
       forget_instance, update_stats, touch_kernel, touch_kernels, update_kernel, claim_session,
       release_session)
