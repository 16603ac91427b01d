//! Many decisions, one script call: the batch script and the per-worker
//! batcher that feeds it.
//!
//! The script takes the buckets of any number of decisions and evaluates
//! the decisions one after another, in the order given, each exactly as a
//! call of its own would: all-or-nothing over its buckets, against the TATs
//! the decisions before it left. Redis runs a script atomically, so a batch
//! is the same sequence of decisions with nothing interleaved: the counts
//! are exactly those of one call per decision. The one difference is that
//! every decision of a batch sees the same `now` (one `TIME` per call),
//! which is the clock Redis would have read a few microseconds apart.
//!
//! The [`Batcher`] is "smart batching": a decision is sent at once while
//! fewer than [`MAX_IN_FLIGHT`] batches are on the wire, so a quiet worker
//! adds no latency; decisions that arrive while that many are in flight
//! wait in a queue and all go in the next call (at most [`MAX_BATCH`] per
//! call, so one reply stays small). Under load this turns N `EVALSHA`s
//! (N request/reply frames, N script starts, N `TIME`s) into one. Within a
//! call, a run of identical decisions (one busy tenant's concurrent
//! requests) is sent once with its length, which spares Redis the
//! per-decision work. `redis-benchmark`, a call of 9 decisions of one
//! tenant: script time 18.0 → 8.5 µs, Redis CPU per call (network
//! included) 29.0 → 18.1 µs; calls of distinct tenants cost what they did.
//!
//! **Deadlines without a timer per decision.** Each decision carries its
//! deadline (`backend.redis.timeout` after it was queued; queue order is
//! deadline order). A call has one timer, set to its earliest decision's
//! deadline: when it fires, the decisions whose deadline has passed are
//! answered [`LimiterError::Timeout`] and the timer moves on to the next
//! one, so each decision of a batch gets its whole timeout and the call
//! is given up only when its last decision's has passed. When Redis
//! answers in time that is one timer per call, not one per decision. A
//! decision still queued when its deadline passes is answered `Timeout`
//! by the next flusher to look at the queue, and not sent; one always
//! looks by then, because the calls in flight while it waited hold only
//! decisions queued before it, so each of them ends by its deadline. (A
//! timer per decision cost a timer-wheel insert and removal each, and
//! often a wake-up of the worker's own event loop, an `eventfd` write:
//! ~0.27 `write` calls per request under `wrk -c64`.)
//!
//! There is no long-lived task: the decision that finds a free in-flight
//! slot spawns a short *flusher* on the caller's runtime, which sends
//! batches until the queue is empty and then ends. A batcher therefore
//! lives wherever its decisions are made (each worker's current-thread
//! runtime), costs nothing while idle and cannot be left behind.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::super::LimiterError;

/// Check-and-debit over a sequence of decisions.
///
/// KEYS are the batch's buckets, each once, in order of first use. The
/// decisions come in *runs*: consecutive decisions with the same buckets
/// and the same arguments (a busy tenant's concurrent requests) are sent
/// once, with how many they are. ARGV is one string of little-endian
/// `f64`s, read with Redis's bundled `struct` library: per run, its bucket
/// count `n` and its length `count`, followed by `key, interval, tau, cost`
/// per bucket (`key` a 1-based index into KEYS; microseconds and tokens).
/// Each bucket is a string key holding `<tat>:<interval>`; a TAT stored
/// under another interval is re-expressed in the current one (see
/// `Gcra::normalize`) and written back even when the decision is refused,
/// so that the conversion happens once.
///
/// A run is decided exactly as its decisions would be one by one: each is
/// all-or-nothing over its buckets and, admitted, moves every bucket's TAT
/// on by `cost * interval`; the first refusal changes nothing, so every
/// later decision of the run is refused too. The script therefore counts
/// the admitted prefix instead of re-reading the arguments per decision.
///
/// The keys are read with one `MGET` and each changed key is written once,
/// at the end, with its final value: the decisions in between work on Lua
/// arrays indexed like KEYS.
///
/// Why this shape (callgrind on redis-server 7.0, a call of 9 decisions of
/// distinct tenants): the arguments as decimal strings cost a `strtod`
/// each, twice under `tonumber`, and Redis builds a Lua string and a table
/// slot per argument; tables keyed by key name grew and rehashed on every
/// call. Packed doubles (the same values `strtod` would give: both round
/// to nearest), KEYS deduplicated by the caller and the TTL formatted as
/// an integer took the script from ~480k to ~353k instructions per call;
/// arrays made at their full size and a TTL formatted only when it
/// differs from the last key's, to ~335k.
///
/// Returns one flat array: `now`, then per run the number admitted (a
/// prefix of the run) followed by its `n` TATs as they were before the
/// run (`max(tat, now)`, re-expressed); [`split`] derives each decision's
/// own TATs from them, and the caller its reply (remaining, reset,
/// retry-after) with `evaluate`, the arithmetic the memory backend uses.
pub(super) const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local reply = { now }
local nreply = 1
-- Every bucket's stored state, read once into arrays indexed like KEYS;
-- runs then read and write these, and each changed key is written once
-- at the end. The arrays are made at their full size at once: the MGET
-- reply becomes `tat_of`, and `{unpack(KEYS)}` sizes the others (filled
-- from `{}`, a table of 9 is rebuilt 5 times as it grows).
local nkeys = #KEYS
local values = nkeys > 0 and redis.call('MGET', unpack(KEYS)) or {}
local tat_of, interval_of, dirty = values, {unpack(KEYS)}, {unpack(KEYS)}
for i = 1, nkeys do
  local v = values[i]
  local stored, stored_interval = 0, false
  if v then
    local sep = string.find(v, ':', 1, true)
    stored = tonumber(string.sub(v, 1, (sep or 0) - 1)) or 0
    stored_interval = sep and tonumber(string.sub(v, sep + 1)) or false
  end
  tat_of[i] = stored
  interval_of[i] = stored_interval
  dirty[i] = false
end
local args = ARGV[1]
local pos, len = 1, #args
local read = struct.unpack
local slots, tats, steps, taus, intervals, converted = {}, {}, {}, {}, {}, {}
while pos <= len do
  local n, count
  n, count, pos = read('<dd', args, pos)
  for i = 1, n do
    local s, interval, tau, cost
    s, interval, tau, cost, pos = read('<dddd', args, pos)
    local tat = now
    local stored = tat_of[s]
    converted[i] = false
    if stored > now then
      local stored_interval = interval_of[s]
      if stored_interval and stored_interval ~= interval and stored_interval > 0 then
        stored = now + math.floor((stored - now) * interval / stored_interval)
        converted[i] = true
      end
      tat = stored
    end
    slots[i] = s
    tats[i] = tat
    intervals[i] = interval
    taus[i] = tau
    steps[i] = cost * interval
  end
  -- The admitted prefix: decision m (0-based) sees every TAT moved on by
  -- the m admitted before it.
  local m = 0
  while m < count do
    local ok = true
    for i = 1, n do
      if tats[i] + (m + 1) * steps[i] - now > taus[i] then
        ok = false
        break
      end
    end
    if not ok then break end
    m = m + 1
  end
  nreply = nreply + 1
  reply[nreply] = m
  for i = 1, n do
    nreply = nreply + 1
    reply[nreply] = tats[i]
    if m > 0 or converted[i] then
      local s = slots[i]
      tat_of[s] = tats[i] + m * steps[i]
      interval_of[s] = intervals[i]
      dirty[s] = true
    end
  end
end
-- Keys of one call mostly share a TTL (new tenants of a tier, in
-- milliseconds): a TTL is formatted only when it differs from the last.
local last_ttl, px = -1, ''
for i = 1, nkeys do
  if dirty[i] then
    local tat = tat_of[i]
    local ttl = math.ceil((tat - now) / 1000)
    if ttl < 1 then ttl = 1 end
    if ttl ~= last_ttl then
      px = string.format('%d', ttl)
      last_ttl = ttl
    end
    redis.call('SET', KEYS[i], string.format('%d:%d', tat, interval_of[i]), 'PX', px)
  end
end
return reply
"#;

/// Batches in flight at once per worker before decisions start queueing.
/// A few keep the socket and Redis busy while the next batch fills; in the
/// e2e bench 4 measured at least as well as 1, 2 or 8 (within its noise).
pub const MAX_IN_FLIGHT: usize = 4;

/// Decisions per script call at most: bounds the reply and the time Redis
/// spends in one script.
pub const MAX_BATCH: usize = 128;

/// One decision's part of a script call.
#[derive(Debug)]
pub(super) struct Request {
    /// Bucket keys; the first `n` are used.
    pub keys: [String; 4],
    /// `interval, tau, cost` per bucket; the first `3 * n` are used.
    pub args: [u64; 12],
    /// Number of buckets (1..=4).
    pub n: usize,
}

/// The same decision: same buckets, same arguments (the unused tail of
/// the arrays does not count).
impl PartialEq for Request {
    fn eq(&self, other: &Request) -> bool {
        self.n == other.n
            && self.keys[..self.n] == other.keys[..other.n]
            && self.args[..3 * self.n] == other.args[..3 * other.n]
    }
}

/// What the script decided for one decision.
#[derive(Debug, Clone, Copy)]
pub(super) struct Verdict {
    /// Whether every bucket was debited.
    pub admitted: bool,
    /// Redis's clock during the call, in microseconds.
    pub now: u64,
    /// The buckets' TATs before this decision; the first `n` are used.
    pub tats: [u64; 4],
}

/// Maps a failed call to the limiter's error kinds.
pub(super) fn classify(e: redis::RedisError) -> LimiterError {
    if e.is_timeout() {
        LimiterError::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        LimiterError::Unavailable(e.to_string())
    } else {
        LimiterError::Redis(e.to_string())
    }
}

/// Runs the script once over `reqs` and splits the reply into one verdict
/// per request, in order. Consecutive identical requests go as one run
/// (see [`SCRIPT`]). Unbounded: the caller bounds it.
pub(super) async fn call<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    script: &redis::Script,
    reqs: &[&Request],
) -> Result<Vec<Verdict>, LimiterError> {
    let runs = runs(reqs);
    let mut inv = script.prepare_invoke();
    let (keys, args) = encode(&runs);
    for key in keys {
        inv.key(key);
    }
    inv.arg(args);
    let call = async {
        match inv.invoke_async::<Vec<u64>>(conn).await {
            // A connection that broke while the circuit was open (or idle)
            // fails its first call while it reconnects: retry once, within
            // the caller's bound. Should the connection have dropped after
            // Redis ran the script, the retry takes one token more per
            // decision than it should: it errs on the strict side.
            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                inv.invoke_async::<Vec<u64>>(conn).await
            }
            other => other,
        }
    };
    let reply = call.await.map_err(classify)?;
    split(&reply, &runs, reqs.len())
}

/// `reqs` as runs of consecutive identical requests, each with its length.
fn runs<'a>(reqs: &[&'a Request]) -> Vec<(&'a Request, usize)> {
    let mut runs: Vec<(&Request, usize)> = Vec::with_capacity(reqs.len());
    for &r in reqs {
        match runs.last_mut() {
            Some((last, count)) if *last == r => *count += 1,
            _ => runs.push((r, 1)),
        }
    }
    runs
}

/// The script's KEYS and ARGV for `runs`: each key once, in order of first
/// use, and the runs' numbers as little-endian `f64`s, a key given by its
/// 1-based place in KEYS (see [`SCRIPT`]).
fn encode<'a>(runs: &[(&'a Request, usize)]) -> (Vec<&'a str>, Vec<u8>) {
    let mut keys: Vec<&str> = Vec::with_capacity(runs.len());
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(runs.len());
    let size = runs.iter().map(|(r, _)| 8 * (2 + 4 * r.n)).sum();
    let mut args = Vec::with_capacity(size);
    let mut put = |v: u64| args.extend_from_slice(&(v as f64).to_le_bytes());
    for &(r, count) in runs {
        put(r.n as u64);
        put(count as u64);
        for (i, key) in r.keys[..r.n].iter().enumerate() {
            let at = *index.entry(key.as_str()).or_insert_with(|| {
                keys.push(key.as_str());
                keys.len()
            });
            put(at as u64);
            for &a in &r.args[3 * i..3 * i + 3] {
                put(a);
            }
        }
    }
    (keys, args)
}

/// Splits the script's flat reply into one verdict per decision of `runs`
/// (`total` in all). Decision `j` of a run whose first `m` were admitted
/// saw each TAT moved on by `min(j, m)` debits.
fn split(
    reply: &[u64],
    runs: &[(&Request, usize)],
    total: usize,
) -> Result<Vec<Verdict>, LimiterError> {
    let bad = || LimiterError::Redis(format!("unexpected script reply of {} values", reply.len()));
    let (&now, mut rest) = reply.split_first().ok_or_else(bad)?;
    let mut out = Vec::with_capacity(total);
    for &(r, count) in runs {
        let n = r.n;
        if rest.len() < n + 1 {
            return Err(bad());
        }
        let admitted = usize::try_from(rest[0]).map_err(|_| bad())?;
        if admitted > count {
            return Err(bad());
        }
        let before = &rest[1..=n];
        for j in 0..count {
            let debits = j.min(admitted) as u64;
            let mut tats = [0u64; 4];
            for (i, (tat, before)) in tats.iter_mut().zip(before).enumerate() {
                let step = r.args[3 * i + 2].saturating_mul(r.args[3 * i]);
                *tat = before.saturating_add(debits.saturating_mul(step));
            }
            out.push(Verdict {
                admitted: j < admitted,
                now,
                tats,
            });
        }
        rest = &rest[n + 1..];
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// A decision waiting for (or riding in) a batch.
struct Pending {
    req: Request,
    /// When its caller's wait ends (see the module docs).
    deadline: Instant,
    reply: oneshot::Sender<Result<Verdict, LimiterError>>,
}

/// The queue and how many flushers are sending.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    in_flight: usize,
    /// Emptied batch buffers, kept for the next flusher: a batch of a
    /// dozen decisions is a few kilobytes, past what the allocator keeps
    /// per thread, and making and freeing one per call showed up in
    /// callgrind as glibc's chunk consolidation.
    spare: Vec<Buffers>,
}

/// One call's decisions, split into what is sent and who waits for it.
#[derive(Default)]
struct Buffers {
    reqs: Vec<Request>,
    waiters: Vec<Waiter>,
}

struct Shared {
    conn: ConnectionManager,
    script: redis::Script,
    timeout: Duration,
    queue: Mutex<Queue>,
}

/// Coalesces one worker's concurrent decisions into script calls over a
/// single server's connection (see the module docs).
pub(super) struct Batcher(Arc<Shared>);

impl Batcher {
    /// A batcher over `conn` whose decisions wait at most `timeout`;
    /// spawns nothing until the first decision.
    pub fn new(conn: ConnectionManager, timeout: Duration) -> Batcher {
        Batcher(Arc::new(Shared {
            conn,
            script: redis::Script::new(SCRIPT),
            timeout,
            queue: Mutex::default(),
        }))
    }

    /// Queues `req` and waits for its verdict, which comes within the
    /// batcher's timeout (shortly after it at worst: a timer's and a
    /// task's scheduling), as [`LimiterError::Timeout`] if Redis has not
    /// answered by then. Must be called inside a Tokio runtime (the
    /// flusher is spawned there). A decision abandoned before its batch is
    /// sent is dropped from it, so it takes no tokens.
    pub async fn submit(&self, req: Request) -> Result<Verdict, LimiterError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Taken under the lock: queue order is deadline order, which
            // the flusher relies on.
            let deadline = Instant::now() + self.0.timeout;
            q.pending.push(Pending {
                req,
                deadline,
                reply: tx,
            });
            let start = q.in_flight < MAX_IN_FLIGHT;
            q.in_flight += start as usize;
            start
        };
        if start {
            tokio::spawn(flush(InFlight {
                shared: self.0.clone(),
                held: true,
            }));
        }
        rx.await.unwrap_or_else(|_| Err(abandoned()))
    }
}

/// One in-flight slot. A flusher gives it back under the queue's lock when
/// it finds the queue empty; `Drop` gives it back should the flusher be
/// dropped mid-call instead (its runtime shutting down).
struct InFlight {
    shared: Arc<Shared>,
    held: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.held {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.in_flight -= 1;
            if q.in_flight == 0 {
                // No flusher is left to send what is queued: answer it now
                // rather than leave it to whichever decision comes next.
                let orphans: Vec<Pending> = q.pending.drain(..).collect();
                drop(q);
                for p in orphans {
                    let _ = p.reply.send(Err(abandoned()));
                }
            }
        }
    }
}

/// The answer to a decision whose flusher ended without sending it.
fn abandoned() -> LimiterError {
    LimiterError::Unavailable("batch abandoned".into())
}

/// Sends batches until the queue is empty.
async fn flush(mut slot: InFlight) {
    let shared = slot.shared.clone();
    let mut buf: Option<Buffers> = None;
    loop {
        let (mut b, expired) = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Decisions whose caller gave up (client gone) are not sent:
            // nobody would learn their verdict. Those past their deadline
            // are answered below, and not sent either.
            let now = Instant::now();
            let expired: Vec<Pending> = q
                .pending
                .extract_if(.., |p| p.reply.is_closed() || p.deadline <= now)
                .collect();
            if q.pending.is_empty() {
                // Gives the slot back under the lock that a submitter
                // checks `in_flight` under, so that no decision is ever
                // left queued without a flusher to send it.
                q.in_flight -= 1;
                slot.held = false;
                q.spare.extend(buf);
                drop(q);
                time_out(expired);
                return;
            }
            let mut b = buf.take().or_else(|| q.spare.pop()).unwrap_or_default();
            let take = q.pending.len().min(MAX_BATCH);
            for p in q.pending.drain(..take) {
                b.reqs.push(p.req);
                b.waiters.push(Waiter {
                    deadline: p.deadline,
                    reply: Some(p.reply),
                });
            }
            (b, expired)
        };
        time_out(expired);
        let refs: Vec<&Request> = b.reqs.iter().collect();
        let mut conn = shared.conn.clone();
        let result = by_deadlines(call(&mut conn, &shared.script, &refs), &mut b.waiters).await;
        drop(refs);
        // Waiters answered `Timeout` meanwhile have no reply left.
        match result {
            Some(Ok(verdicts)) => {
                for (w, v) in b.waiters.drain(..).zip(verdicts) {
                    if let Some(reply) = w.reply {
                        let _ = reply.send(Ok(v));
                    }
                }
            }
            Some(Err(e)) => {
                for reply in b.waiters.drain(..).filter_map(|w| w.reply) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            None => {}
        }
        b.waiters.clear();
        b.reqs.clear();
        buf = Some(b);
    }
}

/// A decision of a batch on the wire: its deadline, and where its verdict
/// goes until it is answered.
struct Waiter {
    deadline: Instant,
    reply: Option<oneshot::Sender<Result<Verdict, LimiterError>>>,
}

/// Drives `call` while answering each of `waiters` (in deadline order)
/// [`LimiterError::Timeout`] at its own deadline; one timer, moved from
/// deadline to deadline. `None` once every waiter has been answered so:
/// the call is given up. Otherwise the call's result, for the waiters
/// whose `reply` is still there.
async fn by_deadlines<T>(call: impl Future<Output = T>, waiters: &mut [Waiter]) -> Option<T> {
    let first = waiters.first()?.deadline;
    tokio::pin!(call);
    let timer = tokio::time::sleep_until(first);
    tokio::pin!(timer);
    let mut next = 0;
    loop {
        tokio::select! {
            biased;
            out = &mut call => return Some(out),
            () = &mut timer => {
                let now = Instant::now();
                while let Some(w) = waiters.get_mut(next).filter(|w| w.deadline <= now) {
                    if let Some(reply) = w.reply.take() {
                        let _ = reply.send(Err(LimiterError::Timeout));
                    }
                    next += 1;
                }
                let w = waiters.get(next)?;
                timer.as_mut().reset(w.deadline);
            }
        }
    }
}

/// Answers decisions that waited in the queue past their deadline.
fn time_out(expired: Vec<Pending>) {
    for p in expired {
        let _ = p.reply.send(Err(LimiterError::Timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, n: usize, cost: u64) -> Request {
        let mut r = Request {
            keys: Default::default(),
            args: [0; 12],
            n,
        };
        for i in 0..n {
            r.keys[i] = format!("{key}{i}");
            // interval 10, tau 100, cost
            r.args[3 * i..3 * i + 3].copy_from_slice(&[10, 100, cost]);
        }
        r
    }

    #[test]
    fn runs_are_consecutive_identical_requests_only() {
        let (a, a2, b) = (req("a", 1, 1), req("a", 1, 1), req("a", 1, 2));
        let mut c = req("a", 1, 1);
        // The unused tail of the arrays does not make requests differ.
        c.keys[3] = "junk".into();
        c.args[11] = 7;
        let got: Vec<usize> = runs(&[&a, &a2, &c, &b, &a]).iter().map(|r| r.1).collect();
        assert_eq!(got, [3, 1, 1], "same, same, same, other cost, same again");
    }

    #[test]
    fn encode_sends_each_key_once_and_refers_to_it_by_place() {
        // Runs: a0+a1 twice (costs 1, then 2), b0, then key a1 alone.
        let (a, a_cost2, b) = (req("a", 2, 1), req("a", 2, 2), req("b", 1, 1));
        let mut a1 = req("a", 1, 1);
        a1.keys[0] = "a1".into();
        let runs = runs(&[&a, &a, &a_cost2, &b, &a1]);
        let (keys, args) = encode(&runs);
        assert_eq!(keys, ["a0", "a1", "b0"]);
        let nums: Vec<f64> = args
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        #[rustfmt::skip]
        let want = [
            2.0, 2.0, 1.0, 10.0, 100.0, 1.0, 2.0, 10.0, 100.0, 1.0, // a0 a1, twice
            2.0, 1.0, 1.0, 10.0, 100.0, 2.0, 2.0, 10.0, 100.0, 2.0, // cost 2
            1.0, 1.0, 3.0, 10.0, 100.0, 1.0,                        // b0
            1.0, 1.0, 2.0, 10.0, 100.0, 1.0,                        // a1 alone
        ];
        assert_eq!(nums, want);
    }

    #[test]
    fn encode_gives_a_u64_the_double_strtod_would() {
        // Past 2^53 a u64 has no exact double: both round to nearest.
        let mut r = req("k", 1, 1);
        r.args[..3].copy_from_slice(&[(1 << 53) + 1, u64::MAX, 1]);
        let (_, args) = encode(&runs(&[&r]));
        // n, count, key, then interval and tau.
        let interval = f64::from_le_bytes(args[24..32].try_into().unwrap());
        let tau = f64::from_le_bytes(args[32..40].try_into().unwrap());
        assert_eq!(
            interval,
            ((1u64 << 53) + 1).to_string().parse::<f64>().unwrap()
        );
        assert_eq!(tau, u64::MAX.to_string().parse::<f64>().unwrap());
    }

    #[test]
    fn split_gives_each_decision_of_a_run_its_own_tats() {
        let (one, two) = (req("a", 1, 1), req("b", 2, 2));
        // now 100; run of 3 (2 admitted) from TAT 500; run of 2 (none)
        // from TATs 7 and 8.
        let reply = [100, 2, 500, 0, 7, 8];
        let v = split(&reply, &[(&one, 3), (&two, 2)], 5).unwrap();
        let got: Vec<(bool, u64, u64)> = v
            .iter()
            .map(|v| (v.admitted, v.tats[0], v.tats[1]))
            .collect();
        assert_eq!(
            got,
            [
                (true, 500, 0),
                (true, 510, 0),
                (false, 520, 0),
                (false, 7, 8),
                (false, 7, 8),
            ]
        );
        assert!(v.iter().all(|v| v.now == 100));
    }

    #[test]
    fn split_rejects_a_reply_of_the_wrong_shape() {
        let (one, two) = (req("a", 1, 1), req("b", 2, 1));
        assert!(split(&[100, 1, 7], &[(&two, 1)], 1).is_err());
        assert!(split(&[100, 1, 7, 8], &[(&one, 1)], 1).is_err());
        assert!(
            split(&[100, 3, 7], &[(&one, 2)], 2).is_err(),
            "more admitted than sent"
        );
        assert!(split(&[], &[(&one, 1)], 1).is_err());
    }
}
