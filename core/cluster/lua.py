"""The Lua scripts that decide limits and credits in Redis: one script run
per decision, atomic on the server (Redis runs one script at a time).

They are ``core/policy/ratelimit.py`` line for line (``_gcra``,
``_window``, ``_sliding``, ``acquire``, ``release``): the same float
operations in the same order, since Lua numbers are IEEE doubles like
Python floats, so a decision in Redis is the one a single process would
make (tests/test_cluster_decide.py checks it against the Python code).

Floats cross the wire as ``%.17g`` strings both ways: Redis turns a Lua
number it returns into an integer, and 17 significant digits round-trip a
double exactly.

State (``decide.py`` names the keys):

* a limit: a string ``"tat window count previous"`` with a TTL a while past
  the moment the limit is whole again (an expired state and a whole one
  decide the same, so Redis may drop it; ``noeviction`` keeps it otherwise);
* a balance: a hash ``v`` (credits version), ``b`` (balance), ``r`` (last
  refill, ``""`` for none).
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["CREDIT", "DECIDE", "SCRIPTS", "UNDO", "USAGE", "Script"]


class Script:
    """A script's source and SHA1 (what ``EVALSHA`` names it by)."""

    __slots__ = ("decision", "name", "sha", "source")

    def __init__(self, name: str, source: str, *, decision: bool = True) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        #: Sent by the batcher's thin path (``resp.py``); False: by coredis.
        self.decision = decision

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


_COMMON = r"""
local EPS = 1e-6
local ULP = 4.5e-16
local KEEP = 10.0  -- seconds a state is kept past the moment it is whole

local function f17(x) return string.format('%.17g', x) end

local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function units(span, t, most)
  local e = EPS / t
  if e > 0.5 then e = 0.5 end
  local u = math.floor(span / t + e)
  if u < 0 then return 0 elseif u > most then return most end
  return u
end

local function load_state(key)
  local raw = redis.call('GET', key)
  if not raw then return 0.0, -1, 0, 0 end
  local a, b, c, d = string.match(raw, '^(%S+) (%S+) (%S+) (%S+)$')
  return tonumber(a), tonumber(b), tonumber(c), tonumber(d)
end

local function store_state(key, algo, period, now, tat, window, count, previous)
  local whole
  if algo == 'g' then whole = tat else whole = (window + 2) * period end
  local ttl = math.ceil((whole - now + KEEP) * 1000)
  if ttl < 1000 then ttl = 1000 end
  redis.call('SET', key, f17(tat) .. ' ' .. f17(window) .. ' ' .. f17(count) .. ' '
    .. f17(previous), 'PX', ttl)
end

local function window_of(period, window, count, previous, now)
  local index = math.floor((now + EPS) / period)
  if index == window then return index, previous, count end
  if index == window + 1 then return index, count, 0 end
  return index, 0, 0
end
"""

DECIDE: Final = Script(
    "decide",
    _COMMON
    + r"""
-- KEYS: n limit states, then m balances.
-- ARGV: now ('' = Redis's clock), cost, n, m,
--       n x (limit, period, algo 'g'|'s'),
--       m x (version, balance if new, refilled_at or '', refill amount, debt: credits
--            this node spent alone while Redis was unreachable, charged now)
local now = clock(ARGV[1])
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local out = {f17(now), 1, 0}
local commits = {}
local refused = false
for i = 1, n do
  local base = 4 + (i - 1) * 3
  local limit = tonumber(ARGV[base + 1])
  local period = tonumber(ARGV[base + 2])
  local algo = ARGV[base + 3]
  local tat, window, count, previous = load_state(KEYS[i])
  local allowed, remaining, reset, wait
  if algo == 'g' then
    local t = period / limit
    local start = now
    if tat > now then start = tat end
    local new_tat = start + cost * t
    local allow_at = new_tat - period
    local slack = limit * now * ULP
    if slack < EPS then
      slack = EPS
    elseif slack > t * 0.5 then
      if t * 0.5 < EPS then slack = EPS else slack = t * 0.5 end
    end
    if allow_at > now + slack then
      allowed = 0
      remaining = units(period - (start - now), t, limit)
      if cost > limit then wait = math.huge else wait = allow_at - now end
      reset = start - now
    else
      allowed = 1
      local most = limit - cost
      if most < 0 then most = 0 end
      remaining = units(period - (new_tat - now), t, most)
      reset = new_tat - now
      wait = 0.0
      commits[#commits + 1] = {KEYS[i], 'g', period, new_tat, window, count, previous}
    end
  else
    local index, prev, cnt = window_of(period, window, count, previous, now)
    local start = index * period
    local weight = 1.0 - (now - start) / period
    if weight < 0.0 then weight = 0.0 end
    if weight > 1.0 then weight = 1.0 end
    local used = prev * weight + cnt
    reset = start + period - now
    if reset < 0.0 then reset = 0.0 end
    if used + cost <= limit + EPS then
      allowed = 1
      remaining = math.floor(limit - used - cost + EPS)
      if remaining < 0 then remaining = 0 end
      if remaining > limit - cost then remaining = limit - cost end
      wait = 0.0
      commits[#commits + 1] = {KEYS[i], 's', period, tat, index, cnt + cost, prev}
    else
      allowed = 0
      local room = limit - cnt - cost
      if prev > 0 and room >= 0 then
        wait = start + period * (1.0 - room / prev) - now
      else
        local nxt = start + period
        local room_next = limit - cost
        if room_next < 0 then
          wait = math.huge
        elseif cnt > 0 then
          local share = 1.0 - room_next / cnt
          if share < 0.0 then share = 0.0 end
          wait = nxt + period * share - now
        else
          wait = nxt - now
        end
      end
      remaining = math.floor(limit - used + EPS)
      if remaining < 0 then remaining = 0 end
      if remaining > limit then remaining = limit end
      if wait < 1e-3 then wait = 1e-3 end
    end
  end
  if allowed == 0 then refused = true end
  out[#out + 1] = allowed
  out[#out + 1] = remaining
  out[#out + 1] = f17(reset)
  out[#out + 1] = f17(wait)
end
if refused then out[2] = 0 end
-- The balances: each reconciled with what the node knows (a newer credits
-- version replaces it, a refill the node computed tops it up once), then
-- all taken or none.
local balances = {}
local cbase = 4 + n * 3
for j = 1, m do
  local a = cbase + (j - 1) * 5
  local version = tonumber(ARGV[a + 1])
  local key = KEYS[n + j]
  local v, b, r = unpack(redis.call('HMGET', key, 'v', 'b', 'r'))
  local changed = false
  local fresh = false
  if not v or tonumber(v) < version then
    -- The node's balance already has its own spending in it: no debt.
    v, b, r = version, tonumber(ARGV[a + 2]), ARGV[a + 3]
    changed = true
    fresh = true
  else
    v, b = tonumber(v), tonumber(b)
    local given = ARGV[a + 3]
    if v == version and given ~= '' and (r == '' or tonumber(given) > tonumber(r)) then
      local amount = tonumber(ARGV[a + 4])
      if amount > b then b = amount end
      r = given
      changed = true
    end
  end
  local debt = tonumber(ARGV[a + 5])
  if debt > 0 and not fresh and v == version then
    b = b - debt
    if b < 0 then b = 0 end
    changed = true
  end
  balances[j] = {key, v, b, r, changed}
  if not refused and b < cost and out[3] == 0 then
    out[2] = 2
    out[3] = j
  end
end
if out[2] == 1 then
  for _, c in ipairs(commits) do
    store_state(c[1], c[2], c[3], now, c[4], c[5], c[6], c[7])
  end
  for _, bal in ipairs(balances) do
    bal[3] = bal[3] - cost
    bal[5] = true
  end
end
for _, bal in ipairs(balances) do
  -- A reconciled balance is kept even when the request was refused: the
  -- next decision starts from it (a refill is applied once, not per try).
  if bal[5] then
    redis.call('HSET', bal[1], 'v', string.format('%d', bal[2]), 'b',
      string.format('%d', bal[3]), 'r', bal[4])
  end
  out[#out + 1] = bal[2]
  out[#out + 1] = bal[3]
  out[#out + 1] = bal[4]
end
return out
""",
)

UNDO: Final = Script(
    "undo",
    _COMMON
    + r"""
-- Give back what a granted decision took.
-- KEYS: n limit states, then m balances.
-- ARGV: now ('' = Redis's clock), cost, at (the decision's now), n, m,
--       n x (limit, period, algo), m x (version, refilled_at or '', amount)
local now = clock(ARGV[1])
local cost = tonumber(ARGV[2])
local at = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local m = tonumber(ARGV[5])
for i = 1, n do
  local base = 5 + (i - 1) * 3
  local limit = tonumber(ARGV[base + 1])
  local period = tonumber(ARGV[base + 2])
  local algo = ARGV[base + 3]
  local tat, window, count, previous = load_state(KEYS[i])
  if algo == 'g' then
    tat = tat - cost * (period / limit)
    if tat < now then tat = now end
    if tat <= now then tat = 0.0 end
    store_state(KEYS[i], algo, period, now, tat, window, count, previous)
  else
    local index, prev, cnt = window_of(period, window, count, previous, now)
    if index == math.floor((at + EPS) / period) then
      cnt = cnt - cost
      if cnt < 0 then cnt = 0 end
      store_state(KEYS[i], algo, period, now, tat, index, cnt, prev)
    end
  end
end
local cbase = 5 + n * 3
for j = 1, m do
  local a = cbase + (j - 1) * 3
  local key = KEYS[n + j]
  local v, b, r = unpack(redis.call('HMGET', key, 'v', 'b', 'r'))
  -- Only into the balance it came from: not after a reset or a refill.
  if v and tonumber(v) == tonumber(ARGV[a + 1]) and r == ARGV[a + 2] then
    redis.call('HSET', key, 'b', string.format('%d', tonumber(b) + tonumber(ARGV[a + 3])))
  end
end
return 1
""",
)

USAGE: Final = Script(
    "usage",
    r"""
-- Usage counters, cluster-wide: KEYS[1] the subject's usage hash.
-- ARGV: requests, 1xx, 2xx, 3xx, 4xx, 5xx, credits taken, last used (string)
local key = KEYS[1]
local names = {'requests', 's1', 's2', 's3', 's4', 's5', 'taken'}
for i, name in ipairs(names) do
  local by = tonumber(ARGV[i])
  if by ~= 0 then redis.call('HINCRBY', key, name, by) end
end
local last = redis.call('HGET', key, 'last_used_at')
if not last or tonumber(last) < tonumber(ARGV[8]) then
  redis.call('HSET', key, 'last_used_at', ARGV[8])
end
return 1
""",
)

CREDIT: Final = Script(
    "credit",
    r"""
-- A credit operation (set, increment, decrement) on one balance, atomic
-- against every node's spending. KEYS[1]: the balance.
-- ARGV: version, balance if new, refilled_at or '', refill amount, debt
--       (as DECIDE's), op ('set' | 'increment' | 'decrement'), amount, the
--       largest balance.
-- Returns {status, old, new, version, refilled_at}: status 1 applied,
-- 2 a decrement past the balance, 3 past the largest balance; refused,
-- nothing is written (not even the reconciliation).
local key = KEYS[1]
local version = tonumber(ARGV[1])
local v, b, r = unpack(redis.call('HMGET', key, 'v', 'b', 'r'))
local fresh = false
if not v or tonumber(v) < version then
  v, b, r = version, tonumber(ARGV[2]), ARGV[3]
  fresh = true
else
  v, b = tonumber(v), tonumber(b)
  local given = ARGV[3]
  if v == version and given ~= '' and (r == '' or tonumber(given) > tonumber(r)) then
    local amount = tonumber(ARGV[4])
    if amount > b then b = amount end
    r = given
  end
end
local debt = tonumber(ARGV[5])
if debt > 0 and not fresh and v == version then
  b = b - debt
  if b < 0 then b = 0 end
end
local old = b
local op = ARGV[6]
local amount = tonumber(ARGV[7])
local status = 1
if op == 'set' then
  b = amount
elseif op == 'increment' then
  if b + amount > tonumber(ARGV[8]) then status = 3 else b = b + amount end
elseif op == 'decrement' then
  if amount > b then status = 2 else b = b - amount end
else
  return redis.error_reply('unknown credit operation ' .. op)
end
if status == 1 then
  redis.call('HSET', key, 'v', string.format('%d', v), 'b', string.format('%d', b), 'r', r)
end
return {status, old, b, v, r}
""",
    # An admin operation: by coredis, like every other admin write.
    decision=False,
)

SCRIPTS: Final = (DECIDE, UNDO, USAGE, CREDIT)
