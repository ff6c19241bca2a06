"""``redis://[[user]:password@]host:port/db`` and ``rediss://`` (TLS): a real Redis server, for fleets.

Keys (``<m>`` model key, ``<i>`` identity key, ``<s>`` source id, see :mod:`netloader.registry.base`)::

    netloader:rec:<m>:<i>:<s>   the record (JSON), with an expiry of the record's ttl, refreshed every heartbeat
    netloader:id:<i>            set of the source ids of identity <i> (the lookup index)
    netloader:model:<m>         set of the identity keys of model <m> (the "other identities" index)

A crashed source's record expires by itself. A lookup is one round trip: a small Lua script reads the identity's
set, then each record (at most 64 KiB of it, through ``GETRANGE``) and its remaining TTL, and drops set members
whose record has expired. Liveness is Redis's own expiry: a record without one, or with a longer one than its
ttl allows, is refused whatever it claims. Every call has a connect and a read deadline and is never retried.
"""

from __future__ import annotations

import itertools
import logging
import re
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import ConfigError, RegistryError
from ..manifest import Identity
from .base import (
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_LISTING,
    MAX_RECORDS_PER_LOOKUP,
    LiveSource,
    Registry,
    SourceRecord,
    holds,
    identity_key,
    model_key,
    parse_record,
    skipped,
)

logger = logging.getLogger("netloader")

NAMESPACE = "netloader"
#: the index sets outlive every record they list (members of expired records are dropped by readers)
INDEX_TTL_MS = 3600 * 1000
_SID = re.compile(r"^[0-9a-f]{16}$")
_IKEY = re.compile(r"^[0-9a-f]{32}$")

# KEYS[1]: the identity's set. ARGV: record key prefix, max records, max bytes.
# Returns a flat list: source id, value (at most max bytes + 1 of it), remaining ms (PTTL), ...
_LOOKUP = """
local ids = redis.pcall('SRANDMEMBER', KEYS[1], tonumber(ARGV[2]))
if type(ids) ~= 'table' or ids.err then return {} end
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local value = redis.pcall('GETRANGE', key, 0, tonumber(ARGV[3]))
  if type(value) ~= 'string' then
    table.insert(out, id); table.insert(out, '!'); table.insert(out, -3)
  elseif value == '' then
    redis.call('SREM', KEYS[1], id)
  else
    table.insert(out, id); table.insert(out, value); table.insert(out, redis.call('PTTL', key))
  end
end
return out
"""

# KEYS[1]: the model's set. ARGV: namespace, model key, identity key to leave out, cap.
# Returns how many record keys of the model's other identities exist.
_COUNT_OTHERS = """
local ikeys = redis.pcall('SRANDMEMBER', KEYS[1], tonumber(ARGV[4]))
if type(ikeys) ~= 'table' or ikeys.err then return 0 end
local n = 0
for _, ik in ipairs(ikeys) do
  if ik ~= ARGV[3] then
    local sids = redis.pcall('SRANDMEMBER', ARGV[1] .. ':id:' .. ik, tonumber(ARGV[4]))
    if type(sids) == 'table' and not sids.err then
      if #sids == 0 then redis.call('SREM', KEYS[1], ik) end
      for _, sid in ipairs(sids) do
        n = n + redis.call('EXISTS', ARGV[1] .. ':rec:' .. ARGV[2] .. ':' .. ik .. ':' .. sid)
      end
    end
  end
end
return n
"""


class RedisRegistry(Registry):
    def __init__(self, url: str, shown: str, timeout: float) -> None:
        self.url = shown  # the URL without its password, for messages
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # the client's default retries 10 times with back-off
                retry_on_timeout=False,
                health_check_interval=0,
                max_connections=4,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid registry URL {shown}: {exc}") from None
        self._lookup = self._client.register_script(_LOOKUP)
        self._count_others = self._client.register_script(_COUNT_OTHERS)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            raise RegistryError(f"registry {self.url} did not answer ({what}): {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _keys(record_or_identity: SourceRecord | Identity) -> tuple[str, str, str]:
        identity = record_or_identity.identity if isinstance(record_or_identity, SourceRecord) else record_or_identity
        m, i = model_key(identity.model_id), identity_key(identity)
        return f"{NAMESPACE}:rec:{m}:{i}:", f"{NAMESPACE}:id:{i}", f"{NAMESPACE}:model:{m}"

    def publish(self, record: SourceRecord) -> None:
        prefix, id_set, model_set = self._keys(record)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(prefix + record.source_id, record.to_json(), px=max(1, int(record.ttl * 1000)))
        pipe.sadd(id_set, record.source_id)
        pipe.pexpire(id_set, INDEX_TTL_MS)
        pipe.sadd(model_set, identity_key(record.identity))
        pipe.pexpire(model_set, INDEX_TTL_MS)
        self._call("publish", pipe.execute)

    def remove(self, record: SourceRecord) -> None:
        prefix, id_set, _ = self._keys(record)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(prefix + record.source_id)
        pipe.srem(id_set, record.source_id)
        self._call("remove", pipe.execute)

    def _live(self, key: str, value: bytes | str, pttl: int, ikey: str, identity: Identity | None = None
              ) -> LiveSource | None:
        where = f"{self.url} key {key}"
        if value in (b"!", "!"):
            skipped.warning(where, "netloader registry: skipping %s: not a string", where)
            return None
        data = value.encode() if isinstance(value, str) else value
        record = parse_record(data, where)
        if record is None:
            return None
        if pttl <= 0 or pttl > record.ttl * 1000 + 1000:
            skipped.warning(where, "netloader registry: skipping %s: it %s", where,
                            "never expires" if pttl == -1 else f"expires in {pttl} ms, beyond its ttl")
            return None
        if not (holds(record, identity) if identity is not None else identity_key(record.identity) == ikey):
            skipped.warning(where, "netloader registry: skipping %s: its identity is not the one its key says", where)
            return None
        return LiveSource(record, max(0.0, record.ttl - pttl / 1000))

    def lookup(self, identity: Identity) -> list[LiveSource]:
        prefix, id_set, _ = self._keys(identity)
        reply = self._call("lookup", self._lookup, keys=[id_set],
                           args=[prefix, MAX_RECORDS_PER_LOOKUP, MAX_RECORD_BYTES])
        out = []
        ikey = identity_key(identity)
        for n in range(0, len(reply) - 2, 3):
            sid, value, pttl = reply[n], reply[n + 1], reply[n + 2]
            sid = sid.decode(errors="replace") if isinstance(sid, bytes) else str(sid)
            if not _SID.match(sid):
                where = f"{id_set}/{sid[:40]}"
                skipped.warning(where, "netloader registry: skipping member %r of %s", sid[:40], id_set)
                continue
            live = self._live(prefix + sid, value, int(pttl), ikey, identity)
            if live is not None and live.record.source_id == sid:
                out.append(live)
        return out

    def count_other_identities(self, identity: Identity) -> int:
        _, _, model_set = self._keys(identity)
        args = [NAMESPACE, model_key(identity.model_id), identity_key(identity), MAX_RECORDS_PER_LOOKUP]
        return int(self._call("count", self._count_others, keys=[model_set], args=args))

    def listing(self, model_id: str | None = None) -> list[LiveSource]:
        pattern = f"{NAMESPACE}:rec:{model_key(model_id) if model_id is not None else '*'}:*"
        keys: list[bytes] = self._call(
            "scan", lambda: list(itertools.islice(self._client.scan_iter(match=pattern, count=1000),
                                                  MAX_RECORDS_PER_LISTING))
        )
        out = []
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]
            pipe = self._client.pipeline(transaction=False)
            for key in batch:
                pipe.getrange(key, 0, MAX_RECORD_BYTES)
                pipe.pttl(key)
            replies = self._call("listing", pipe.execute, raise_on_error=False)
            for n, key in enumerate(batch):
                value, pttl = replies[2 * n], replies[2 * n + 1]
                name = key.decode(errors="replace")
                if isinstance(value, Exception) or isinstance(pttl, Exception) or not value:
                    continue
                parts = name.split(":")
                if len(parts) != 5 or not _IKEY.match(parts[3]):
                    continue
                live = self._live(name, value, int(pttl), parts[3])
                if live is not None and (model_id is None or live.record.model_id == model_id):
                    out.append(live)
        return out

    def close(self) -> None:
        self._client.close()
