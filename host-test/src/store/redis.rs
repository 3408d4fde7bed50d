//! [`Backend`] over Redis, for several host replicas sharing one state.
//!
//! Key layout (every key starts with [`PREFIX`]; `ns` is a tenant id or a `#`-namespace and
//! can contain neither `{` nor `}`, so the first `}` ends it and no namespace's keys can be
//! spelled inside another's):
//! - `imbridge:{ns}:kv:<key>`: plugin data, one string per key
//! - `imbridge:{ns}:outbox`: sorted set, score = sequence number, member = `seq:record`
//! - `imbridge:{ns}:outbox-seq`: last sequence number given out
//! - `imbridge:lease:<name>`: lease owner, with a `PX` expiry
//!
//! The braces are Redis Cluster hash tags: one tenant's keys share a slot, so the commit
//! script's multi-key access stays legal there too.
//!
//! A commit is one Lua script (Redis runs scripts atomically): check the read set, apply the
//! writes, append the outbox records. `increment` is WATCH/GET/MULTI/SET/EXEC, so the counter
//! arithmetic is the same Rust code as the embedded store's. Lease expiry is Redis's own
//! (`SET … PX`), so replicas' clocks do not matter.
//!
//! The plugin's key-value imports are synchronous, so each call blocks its thread for one
//! round trip; on loopback or a LAN that is well under a millisecond.

use super::{Backend, Commit, Outcome, Pending, next_counter};
use crate::persistent::LeaseStore;
use anyhow::{Context as _, Result, anyhow, bail};
use redis::{Connection, Script};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

pub const PREFIX: &str = "imbridge:";

/// Idle connections kept for reuse; more may be open while calls run concurrently.
const MAX_IDLE: usize = 16;
/// A Redis that does not answer within this is treated as down (the call fails, typed).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection older than this is PINGed before use: Redis may have restarted or
/// closed it (its `timeout` setting) meanwhile, and a PING has no effect to repeat, unlike
/// the commit that would otherwise fail on it.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How long a commit waits for its replicas (`wait_replicas`); under [`IO_TIMEOUT`], so the
/// `WAIT` answers before the connection gives up on it.
const WAIT_TIMEOUT: Duration = Duration::from_secs(2);

/// KEYS: the read keys, then the write keys, then the outbox and its sequence key.
/// ARGV: #reads, #writes, #records, then per read its SHA-1 hex ("" = absent), per write
/// "s" + value or "d", then the floor of the sequence numbers (`next_seq`), then the
/// records. Lua numbers are doubles: exact for sequence numbers (below 2^53), but printed in
/// exponent form unless formatted as here.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local nr, nw, no = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a = 4
for i = 1, nr do
  local v = redis.call('GET', KEYS[i])
  local seen = ''
  if v then seen = redis.sha1hex(v) end
  if seen ~= ARGV[a] then return 0 end
  a = a + 1
end
for i = 1, nw do
  local k = KEYS[nr + i]
  if ARGV[a] == 's' then
    redis.call('SET', k, ARGV[a + 1])
    a = a + 2
  else
    redis.call('DEL', k)
    a = a + 1
  end
end
local floor = tonumber(ARGV[a])
a = a + 1
for i = 1, no do
  local seq = math.max(tonumber(redis.call('GET', KEYS[nr + nw + 2]) or '0') + 1, floor)
  seq = string.format('%.0f', seq)
  redis.call('SET', KEYS[nr + nw + 2], seq)
  redis.call('ZADD', KEYS[nr + nw + 1], seq, seq .. ':' .. ARGV[a])
  a = a + 1
end
return 1
",
    )
});

/// KEYS[1] lease; ARGV owner, ttl ms. Free or ours: (re)set with expiry.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
",
    )
});

/// KEYS[1] lease; ARGV owner. Deletes only our own lease.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// A write Redis applied that fewer replicas than `wait_replicas` confirmed in time: it stands
/// on the primary, and a failover now could lose it. A call that can run again (a callback)
/// fails on it, so the platform redelivers; one that cannot (a start, a cancel or a notify
/// that acted on a platform) counts it as applied and logs it, since failing would only
/// make its retry find the write done, or a start's key claimed by itself.
#[derive(Debug)]
pub struct NotReplicated {
    pub acked: u64,
    pub wanted: u32,
}

impl std::fmt::Display for NotReplicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Redis applied the write, but only {} of the {} replicas asked for \
             (`wait_replicas`) had it within {} s: a failover now could lose it",
            self.acked,
            self.wanted,
            WAIT_TIMEOUT.as_secs()
        )
    }
}

impl std::error::Error for NotReplicated {}

pub struct RedisStore {
    client: redis::Client,
    /// With when each was last used.
    idle: Mutex<Vec<(Connection, Instant)>>,
    /// The URL without credentials, for the log.
    shown: String,
    /// Replicas that must have a commit before it counts (0: the primary's answer is enough).
    wait_replicas: u32,
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host:port/db`, or `rediss://`) and checks
    /// that the server answers.
    pub fn open(url: &str) -> Result<RedisStore> {
        let shown = redact(url);
        let client = redis::Client::open(url)
            .map_err(|e| anyhow!("invalid Redis URL {shown}: {:?}", e.kind()))?;
        let store = RedisStore {
            client,
            idle: Mutex::new(Vec::new()),
            shown,
            wait_replicas: 0,
        };
        store
            .with(|c| Ok(redis::cmd("PING").query::<String>(c)?))
            .with_context(|| format!("connecting to Redis at {}", store.shown))?;
        Ok(store)
    }

    /// From now on every commit and increment counts only once `n` replicas have it, so a
    /// failover to one of them keeps it: Redis replicates asynchronously, and a primary lost
    /// right after answering takes with it what it had not passed on yet.
    pub fn wait_replicas(mut self, n: u32) -> RedisStore {
        self.wait_replicas = n;
        self
    }

    /// After a write on `c`: waits until the replicas asked for have it. Fewer within
    /// [`WAIT_TIMEOUT`] is a [`NotReplicated`] error, although the write stands on the
    /// primary.
    fn replicated(&self, c: &mut Connection) -> Result<()> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let acked: u64 = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(WAIT_TIMEOUT.as_millis() as u64)
            .query(c)?;
        if acked < u64::from(self.wait_replicas) {
            return Err(NotReplicated {
                acked,
                wanted: self.wait_replicas,
            }
            .into());
        }
        Ok(())
    }

    /// Runs `f` on a pooled connection. A connection that saw any error is dropped rather
    /// than reused: it may be broken, or still WATCHing.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut con = self.checkout()?;
        match f(&mut con) {
            Ok(out) => {
                let mut idle = self.pool();
                if idle.len() < MAX_IDLE {
                    idle.push((con, Instant::now()));
                }
                Ok(out)
            }
            Err(e) => {
                // A dead socket means Redis restarted or failed over: the idle connections
                // are as dead as this one, and each would fail one more call.
                if is_connection_error(&e) {
                    self.pool().clear();
                }
                Err(e)
            }
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<(Connection, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(&self) -> Result<Connection> {
        loop {
            let Some((mut con, since)) = self.pool().pop() else {
                let c = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(c);
            };
            if since.elapsed() < CHECK_IDLE_AFTER
                || redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return Ok(con);
            }
            self.pool().clear();
        }
    }
}

fn is_connection_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<redis::RedisError>()
        .is_some_and(|e| e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal())
}

/// `redis://user:secret@host/0` → `redis://…@host/0`.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_string(),
    }
}

/// The key prefix of a namespace. Namespaces come from validated tenant ids, but a wrong one
/// here would silently share keys, so it is checked again.
fn ns_prefix(ns: &str) -> Result<String> {
    let ok = !ns.is_empty()
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'#'));
    if !ok {
        bail!("invalid store namespace {ns:?}");
    }
    Ok(format!("{PREFIX}{{{ns}}}:"))
}

fn kv_key(ns: &str, key: &str) -> Result<Vec<u8>> {
    let mut k = ns_prefix(ns)?.into_bytes();
    k.extend_from_slice(b"kv:");
    k.extend_from_slice(key.as_bytes());
    Ok(k)
}

fn lease_key(name: &str) -> String {
    format!("{PREFIX}lease:{name}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Backend for RedisStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let k = kv_key(ns, key)?;
        self.with(|c| Ok(redis::cmd("GET").arg(&k).query(c)?))
    }

    fn keys(&self, ns: &str) -> Result<Vec<String>> {
        let prefix = format!("{}kv:", ns_prefix(ns)?);
        // Nothing in the prefix is a glob character (see `ns_prefix`).
        let pattern = format!("{prefix}*");
        let raw: Vec<Vec<u8>> = self.with(|c| {
            let iter = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter::<Vec<u8>>(c)?;
            Ok(iter.collect::<redis::RedisResult<Vec<_>>>()?)
        })?;
        let mut keys = raw
            .into_iter()
            .map(|k| {
                let rest = k[prefix.len()..].to_vec();
                String::from_utf8(rest).context("a stored key is not UTF-8")
            })
            .collect::<Result<Vec<_>>>()?;
        // SCAN may return a key twice.
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
        if commit.is_empty() {
            return Ok(Outcome::Applied);
        }
        let prefix = ns_prefix(ns)?;
        let mut inv = COMMIT.prepare_invoke();
        for (key, _) in &commit.reads {
            inv.key(kv_key(ns, key)?);
        }
        for (key, _) in &commit.writes {
            inv.key(kv_key(ns, key)?);
        }
        inv.key(format!("{prefix}outbox"));
        inv.key(format!("{prefix}outbox-seq"));
        inv.arg(commit.reads.len())
            .arg(commit.writes.len())
            .arg(commit.outbox.len());
        for (_, seen) in &commit.reads {
            inv.arg(seen.map(|d| hex(&d)).unwrap_or_default());
        }
        for (_, value) in &commit.writes {
            match value {
                Some(v) => inv.arg("s").arg(v.as_slice()),
                None => inv.arg("d"),
            };
        }
        inv.arg(super::seq_floor());
        for record in &commit.outbox {
            inv.arg(record.as_slice());
        }
        let applied: i64 = self.with(|c| {
            let applied = inv.invoke(c)?;
            if applied == 1 {
                self.replicated(c)?;
            }
            Ok(applied)
        })?;
        Ok(if applied == 1 {
            Outcome::Applied
        } else {
            Outcome::Conflict
        })
    }

    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> Result<u64> {
        let k = kv_key(ns, key)?;
        self.with(|c| {
            loop {
                redis::cmd("WATCH").arg(&k).exec(c)?;
                let stored: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query(c)?;
                let base = match pending {
                    Some(p) => p,
                    None => stored.as_deref(),
                };
                // An error here leaves the WATCH on the connection, which `with` then drops.
                let new = next_counter(key, base, delta)?;
                let done: Option<()> = redis::pipe()
                    .atomic()
                    .set(&k, new.to_string())
                    .ignore()
                    .query(c)?;
                if done.is_some() {
                    // A claim that fails here would be taken by its own start's retry; a
                    // read (delta 0) wrote nothing new.
                    if delta > 0
                        && let Err(e) = self.replicated(c)
                    {
                        crate::log!("Redis: the increment of {key}: {e:#}");
                    }
                    return Ok(new);
                }
                // Someone else moved the counter between GET and EXEC: read it again.
            }
        })
    }

    fn outbox_page(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let key = format!("{}outbox", ns_prefix(tenant)?);
        let members: Vec<Vec<u8>> = self.with(|c| {
            let mut cmd = redis::cmd("ZRANGEBYSCORE");
            cmd.arg(&key).arg(format!("({after}")).arg("+inf");
            // A negative count means all.
            cmd.arg("LIMIT")
                .arg(0)
                .arg(i64::try_from(limit).unwrap_or(-1));
            Ok(cmd.query(c)?)
        })?;
        members
            .into_iter()
            .map(|m| {
                let colon = m
                    .iter()
                    .position(|&b| b == b':')
                    .context("malformed outbox member")?;
                let seq = std::str::from_utf8(&m[..colon])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .context("malformed outbox sequence number")?;
                Ok((seq, m[colon + 1..].to_vec()))
            })
            .filter(|r| !matches!(r, Ok((seq, _)) if *seq <= after))
            .collect()
    }

    fn outbox_last_seq(&self, tenant: &str) -> Result<u64> {
        let key = format!("{}outbox-seq", ns_prefix(tenant)?);
        let last: Option<u64> = self.with(|c| Ok(redis::cmd("GET").arg(&key).query(c)?))?;
        Ok(last.unwrap_or(0))
    }

    fn outbox_remove_through(&self, tenant: &str, seq: u64) -> Result<()> {
        let key = format!("{}outbox", ns_prefix(tenant)?);
        self.with(|c| {
            Ok(redis::cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(seq)
                .exec(c)?)
        })
    }

    fn describe(&self) -> String {
        match self.wait_replicas {
            0 => format!("Redis at {}", self.shown),
            n => format!(
                "Redis at {}, each write waiting for {n} replica(s)",
                self.shown
            ),
        }
    }

    fn remote(&self) -> bool {
        true
    }
}

impl LeaseStore for RedisStore {
    fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let got: i64 = self.with(|c| {
            Ok(ACQUIRE
                .key(lease_key(name))
                .arg(owner)
                .arg(ttl_ms)
                .invoke(c)?)
        })?;
        Ok(got == 1)
    }

    fn release(&self, name: &str, owner: &str) -> Result<()> {
        self.with(|c| {
            let _: i64 = RELEASE.key(lease_key(name)).arg(owner).invoke(c)?;
            Ok(())
        })
    }

    fn holder(&self, name: &str) -> Result<Option<(String, u64)>> {
        let (owner, pttl, (secs, micros)): (Option<String>, i64, (u64, u64)) = self.with(|c| {
            Ok(redis::pipe()
                .atomic()
                .get(lease_key(name))
                .pttl(lease_key(name))
                .cmd("TIME")
                .query(c)?)
        })?;
        let now_ms = secs * 1000 + micros / 1000;
        Ok(owner.map(|o| (o, now_ms + u64::try_from(pttl.max(0)).unwrap_or(0))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn redaction_hides_credentials() {
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://…@h:1/0");
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert!(ns_prefix("a}b").is_err());
        assert!(ns_prefix("").is_err());
        assert_eq!(ns_prefix("acme.1").unwrap(), "imbridge:{acme.1}:");
    }

    #[test]
    fn conforms() {
        let server = crate::redis_server::RedisServer::start().expect("redis-server");
        super::super::conformance::all(|| {
            let store = RedisStore::open(&server.url()).unwrap();
            store.with(|c| Ok(redis::cmd("FLUSHDB").exec(c)?)).unwrap();
            let store: Arc<dyn Backend> = Arc::new(store);
            store
        });
    }

    /// With `wait_replicas`, a commit or increment no replica confirmed is an error, though it
    /// stands on the primary; once a replica follows, both pass and the replica has them.
    #[test]
    fn writes_wait_for_the_replicas_asked_for() {
        use crate::redis_server::RedisServer;
        let primary = RedisServer::start().expect("redis-server");
        let store = RedisStore::open(&primary.url()).unwrap().wait_replicas(1);
        let commit = |k: &str| Commit {
            writes: vec![(k.into(), Some(b"v".to_vec()))],
            ..Default::default()
        };
        let err = store.commit("t", commit("a")).unwrap_err();
        assert!(err.is::<NotReplicated>(), "{err:#}");
        assert!(
            format!("{err:#}").contains("only 0 of the 1 replicas"),
            "{err:#}"
        );
        assert_eq!(store.get("t", "a").unwrap().as_deref(), Some(&b"v"[..]));
        // A claim is not failed for it (its own retry would find it taken): logged instead.
        assert_eq!(store.increment("t", "n", 1, None).unwrap(), 1);

        let replica = RedisServer::start().expect("redis-server");
        let mut r = redis::Client::open(replica.url())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(primary.port())
            .exec(&mut r)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis::cmd("INFO")
            .arg("replication")
            .query::<String>(&mut r)
            .unwrap()
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the replica never caught up");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(store.commit("t", commit("b")).unwrap(), Outcome::Applied);
        let on_replica: Option<Vec<u8>> = redis::cmd("GET")
            .arg(kv_key("t", "b").unwrap())
            .query(&mut r)
            .unwrap();
        assert_eq!(on_replica.as_deref(), Some(&b"v"[..]));
        assert_eq!(store.increment("t", "n", 1, None).unwrap(), 2);
        let on_replica: Option<String> = redis::cmd("GET")
            .arg(kv_key("t", "n").unwrap())
            .query(&mut r)
            .unwrap();
        assert_eq!(on_replica.as_deref(), Some("2"));
    }

    /// Redis dropping every client (a restart, a failover, its idle `timeout`) costs no call:
    /// each idle connection used to fail the next call made on it.
    #[test]
    fn connections_redis_dropped_are_replaced_before_use() {
        let server = crate::redis_server::RedisServer::start().expect("redis-server");
        let store = RedisStore::open(&server.url()).unwrap();
        // Three connections in the pool, all idle.
        let held: Vec<Connection> = (0..3).map(|_| store.checkout().unwrap()).collect();
        store
            .pool()
            .extend(held.into_iter().map(|c| (c, Instant::now())));
        let mut admin = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query(&mut admin)
            .unwrap();
        assert!(killed >= 3, "{killed}");
        std::thread::sleep(CHECK_IDLE_AFTER);
        for i in 0..4 {
            let w = vec![(format!("k{i}"), Some(b"v".to_vec()))];
            store
                .put("t", w)
                .unwrap_or_else(|e| panic!("call {i}: {e:#}"));
        }
        assert_eq!(store.get("t", "k3").unwrap().as_deref(), Some(&b"v"[..]));
        // Dropped while in use: the call on the first dead connection fails, and with it go
        // the other idle ones, so no further call meets one.
        let held: Vec<Connection> = (0..3).map(|_| store.checkout().unwrap()).collect();
        store
            .pool()
            .extend(held.into_iter().map(|c| (c, Instant::now())));
        let _: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query(&mut admin)
            .unwrap();
        let failed = (0..4)
            .filter(|i| store.get("t", &format!("k{i}")).is_err())
            .count();
        assert!(failed <= 1, "{failed} calls failed");
    }

    #[test]
    fn a_bad_url_or_a_dead_server_is_a_clear_error() {
        let err = RedisStore::open("redis://u:s3cr3t@127.0.0.1:1/0")
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("connecting to Redis at redis://…@127.0.0.1:1/0"),
            "{msg}"
        );
        assert!(!msg.contains("s3cr3t"), "{msg}");
        assert!(RedisStore::open("not a url").is_err());
    }
}
