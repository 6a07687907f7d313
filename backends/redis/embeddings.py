"""The shared second-tier embedding cache: workers plug a ``RedisEmbeddingStore`` into their
Engine (``Engine(shared_embeddings=…)``), so a follow-up click that lands on another worker decodes
against the embedding the first worker computed instead of re-encoding the image.
"""

from __future__ import annotations

import logging
import time

import redis

from backends.redis.protocol import Keys

log = logging.getLogger(__name__)

_PUT_SCRIPT = """
-- KEYS: entry, index (zset key -> last use), sizes (hash key -> bytes), total (counter)
-- ARGV: data, ttl seconds, now (seconds), max total bytes
local function evict(key)
  local size = redis.call('HGET', KEYS[3], key)
  if size then redis.call('DECRBY', KEYS[4], size) end
  redis.call('HDEL', KEYS[3], key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('DEL', key)
end
local now, ttl, limit = tonumber(ARGV[3]), tonumber(ARGV[2]), tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, 256)
for _, key in ipairs(expired) do evict(key) end
if redis.call('HEXISTS', KEYS[3], KEYS[1]) == 1 then evict(KEYS[1]) end
local size = string.len(ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size)
local guard = 0
while total > limit and guard < 1024 do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  evict(oldest[1])
  total = tonumber(redis.call('GET', KEYS[4]) or '0')
  guard = guard + 1
end
return total
"""


class RedisEmbeddingStore:
    """Second-tier embedding cache shared by all workers (``Engine(shared_embeddings=…)``).

    One key per (model, image sha256) holding the model's own serialisation (SAM: fp16 features
    + sizes), with a TTL refreshed on use. Bounded without relying on Redis ``maxmemory``:
    entries over ``max_entry_bytes`` are not shared, and an index (sorted set by last use + a
    size hash + a byte counter) is trimmed, oldest first, to ``max_bytes`` on every put (atomic
    Lua script). Redis errors never fail a click: the store just misses.
    """

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys | None = None,
        *,
        ttl: int = 3600,
        max_bytes: int = 4 << 30,
        max_entry_bytes: int = 64 << 20,
        tier: str = "emb",
    ) -> None:
        """``tier`` names the key prefix: ``emb`` for image embeddings, ``trk`` for video
        tracker states (``backends.tracking``); each tier has its own index and bound."""
        self.redis = connection
        self.keys = keys or Keys()
        self.tier = tier
        self.ttl = int(ttl)
        self.max_bytes = int(max_bytes)
        self.max_entry_bytes = int(max_entry_bytes)
        self._put = connection.register_script(_PUT_SCRIPT)
        self.hits = self.misses = self.puts = self.errors = 0

    def get(self, model: str, image_key: str) -> bytes | None:
        key = self.keys.embedding(model, image_key, self.tier)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.getex(key, ex=self.ttl)
                pipe.zadd(self.keys.tier_index(self.tier), {key: time.time()}, xx=True)
                data, _ = pipe.execute()
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("shared embedding cache unavailable: %s", exc)
            return None
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, model: str, image_key: str, data: bytes) -> None:
        if len(data) > self.max_entry_bytes or len(data) > self.max_bytes:
            return
        keys = self.keys
        try:
            self._put(
                keys=[
                    keys.embedding(model, image_key, self.tier),
                    keys.tier_index(self.tier),
                    keys.tier_sizes(self.tier),
                    keys.tier_bytes(self.tier),
                ],
                args=[data, self.ttl, f"{time.time():.6f}", self.max_bytes],
            )
            self.puts += 1
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("could not share an embedding: %s", exc)

    def total_bytes(self) -> int:
        return int(self.redis.get(self.keys.tier_bytes(self.tier)) or 0)
