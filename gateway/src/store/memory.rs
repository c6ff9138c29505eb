//! The embedded store: everything in this process, nothing to install.

use std::collections::{BTreeMap, BTreeSet, VecDeque, btree_map};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::accounts::Book;
use super::{
    ApiKeyRecord, CreditOutcome, CreditRecord, EVENT_BUFFER, HoldOutcome, HoldRequest, Money,
    QueueCounts, QueueItem, SettleOutcome, SettleRequest, Store, StoreError, StoreEvent,
};

/// Hash maps with foldhash instead of std's SipHash (several lookups per request; see
/// docs/journal/benchmarks.md). Seeded per process, like std's: keys can come from clients.
pub(super) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

#[derive(Default)]
struct Inner {
    keys: HashMap<String, ApiKeyRecord>,
    key_ids_by_hash: HashMap<String, String>,
    /// Keys shared with `expiries` (one allocation per key, not two).
    kv: HashMap<Arc<str>, (Vec<u8>, Option<Instant>)>,
    /// When keys with a TTL expire, soonest first: expired keys are removed as new ones are
    /// written (as Redis expires keys actively), not only found dead when read. Without it a
    /// key per request (the default meter remembers each charged request id) stayed in memory
    /// for good. Names each key with a TTL once, at its current expiry: a key deleted or given
    /// another expiry leaves nothing behind here (a heap could not drop it, and held the key's
    /// name until its old expiry came: an hour, for a key deleted a millisecond after it was
    /// written).
    expiries: BTreeSet<(Instant, Arc<str>)>,
    /// Ordered maps, not hash maps: a kind can grow to millions of records (the usage ledger
    /// gets one per request), and a hash map that doubles rehashes every key at once, holding
    /// the store's lock (and a worker thread) for milliseconds. A B-tree grows a node at a time.
    /// Ids are shared with their kind's [`Capped::order`] (one allocation per id, not two),
    /// values boxed (no spare capacity): a ledger entry is about 150 bytes, and what the store
    /// adds around it was more than that.
    records: HashMap<String, BTreeMap<Arc<str>, Box<[u8]>>>,
    /// Kinds that keep at most so many records: the cap, and their ids oldest first.
    capped: HashMap<String, Capped>,
    queues: HashMap<String, Queue>,
    /// Accounts' money, by account id.
    accounts: HashMap<String, Book>,
    /// Which account's book remembers a request's settlement, until it is forgotten
    /// ([`Store::account_forget_settled`]) or its time runs out.
    settled_in: HashMap<String, String>,
}

/// A kind with a bound: past `max` records, the oldest inserted go.
struct Capped {
    max: usize,
    /// Ids in insertion order. An id deleted by hand stays here until its turn comes, when
    /// removing it again is a no-op.
    order: VecDeque<Arc<str>>,
}

impl Inner {
    /// Inserts the records that are not there yet, dropping the kind's oldest past its cap;
    /// returns which were new. The kind is looked up once, and each id searched for once.
    fn insert_new_many(&mut self, kind: &str, new: &[(&str, &[u8])]) -> Vec<bool> {
        if !self.records.contains_key(kind) {
            self.records.insert(kind.to_owned(), BTreeMap::new());
        }
        let Some(records) = self.records.get_mut(kind) else {
            unreachable!("inserted above")
        };
        let mut capped = self.capped.get_mut(kind);
        new.iter()
            .map(|&(id, value)| {
                let id: Arc<str> = Arc::from(id);
                let btree_map::Entry::Vacant(slot) = records.entry(Arc::clone(&id)) else {
                    return false;
                };
                slot.insert(Box::from(value));
                if let Some(capped) = capped.as_deref_mut() {
                    capped.order.push_back(id);
                    while records.len() > capped.max {
                        let Some(oldest) = capped.order.pop_front() else {
                            break;
                        };
                        records.remove(&oldest);
                    }
                }
                true
            })
            .collect()
    }
}

/// A work queue: waiting items ordered by a sequence number (0 for items whose lease ran out,
/// so they go first), leased ones with their deadline.
#[derive(Default)]
struct Queue {
    next_seq: u64,
    waiting: BTreeSet<(u64, String)>,
    seq_of: HashMap<String, u64>,
    leased: HashMap<String, Instant>,
    payloads: HashMap<String, Vec<u8>>,
}

impl Queue {
    /// Puts items whose lease ran out back at the head of the queue.
    fn requeue_expired(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .leased
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.leased.remove(&id);
            self.waiting.insert((0, id.clone()));
            self.seq_of.insert(id, 0);
        }
    }

    fn remove_waiting(&mut self, id: &str) -> bool {
        match self.seq_of.remove(id) {
            Some(seq) => self.waiting.remove(&(seq, id.to_owned())),
            None => false,
        }
    }
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    events: broadcast::Sender<StoreEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// Keeps at most `max` records of `kind` from now on (the oldest inserted go first), for
    /// kinds that grow with traffic, such as the usage ledger. Records already there count
    /// towards the cap only as they are replaced.
    pub fn cap_records(&self, kind: &str, max: usize) {
        self.lock().capped.insert(
            kind.to_owned(),
            Capped {
                max: max.max(1),
                order: VecDeque::new(),
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // matters more than losing the process's state, so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Expired keys removed per write, at most: a write retires more keys than it can add, so the
/// expired ones never pile up, and no write pays for a long sweep.
const EXPIRED_PER_WRITE: usize = 8;

impl Inner {
    /// Sets `key`, noting when it expires, and removes a few keys that have.
    fn put_kv(&mut self, key: &str, value: Vec<u8>, expiry: Option<Instant>) {
        match self.kv.get_mut(key) {
            // The common write (a counter keeps its expiry): one lookup, no allocation.
            Some(entry) if entry.1 == expiry => entry.0 = value,
            Some(_) => {
                if let Some((name, (_, before))) = self.kv.remove_entry(key) {
                    if let Some(at) = before {
                        self.expiries.remove(&(at, Arc::clone(&name)));
                    }
                    if let Some(at) = expiry {
                        self.expiries.insert((at, Arc::clone(&name)));
                    }
                    self.kv.insert(name, (value, expiry));
                }
            }
            None => {
                let name: Arc<str> = Arc::from(key);
                if let Some(at) = expiry {
                    self.expiries.insert((at, Arc::clone(&name)));
                }
                self.kv.insert(name, (value, expiry));
            }
        }
        let now = Instant::now();
        for _ in 0..EXPIRED_PER_WRITE {
            match self.expiries.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            if let Some((_, name)) = self.expiries.pop_first() {
                self.kv.remove(&name);
            }
        }
    }

    /// Removes `key` and its place in `expiries`.
    fn remove_kv(&mut self, key: &str) {
        if let Some((name, (_, Some(at)))) = self.kv.remove_entry(key) {
            self.expiries.remove(&(at, name));
        }
    }
}

/// Whether a kv entry has not expired (also the replica-local keys' rule, `store::local`).
pub(super) fn live(entry: &(Vec<u8>, Option<Instant>), now: Instant) -> bool {
    entry.1.is_none_or(|expiry| expiry > now)
}

/// The live integer at `key` in `kv` (0 when missing or expired) and the expiry it keeps: its
/// own, or `ttl` from now for a counter about to be created. Shared with `store::local`.
pub(super) fn counter(
    kv: &HashMap<Arc<str>, (Vec<u8>, Option<Instant>)>,
    key: &str,
    ttl: Option<Duration>,
) -> Result<(i64, Option<Instant>), StoreError> {
    let now = Instant::now();
    match kv.get(key) {
        Some(entry @ (bytes, expiry)) if live(entry, now) => {
            let value = std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("{key} is not an integer")))?;
            Ok((value, *expiry))
        }
        _ => Ok((0, ttl.map(|ttl| now + ttl))),
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner
            .key_ids_by_hash
            .insert(key.hash.clone(), key.id.clone());
        inner.keys.insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .key_ids_by_hash
            .get(hash)
            .and_then(|id| inner.keys.get(id))
            .cloned())
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(self.lock().keys.get(id).cloned())
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut keys: Vec<_> = self.lock().keys.values().cloned().collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(keys)
    }

    async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.kv.get(key) {
            Some(entry) if live(entry, now) => Ok(Some(entry.0.clone())),
            Some(_) => {
                inner.remove_kv(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn kv_set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let expiry = ttl.map(|ttl| Instant::now() + ttl);
        self.lock().put_kv(key, value.to_vec(), expiry);
        Ok(())
    }

    async fn kv_incr(
        &self,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StoreError> {
        let mut inner = self.lock();
        let (value, expiry) = counter(&inner.kv, key, ttl)?;
        let next = value.saturating_add(delta);
        inner.put_kv(key, next.to_string().into_bytes(), expiry);
        Ok(next)
    }

    async fn kv_reserve(
        &self,
        key: &str,
        amount: i64,
        limit: i64,
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, StoreError> {
        let mut inner = self.lock();
        let (value, expiry) = counter(&inner.kv, key, ttl)?;
        let next = value.saturating_add(amount);
        if next > limit {
            return Ok(None);
        }
        inner.put_kv(key, next.to_string().into_bytes(), expiry);
        Ok(Some(next))
    }

    async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        self.lock().remove_kv(key);
        Ok(())
    }

    async fn record_put(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        match inner.records.get_mut(kind).and_then(|r| r.get_mut(id)) {
            Some(existing) => *existing = Box::from(value),
            None => {
                inner.insert_new_many(kind, &[(id, value)]);
            }
        }
        Ok(())
    }

    async fn record_get(&self, kind: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .lock()
            .records
            .get(kind)
            .and_then(|records| records.get(id))
            .map(|value| value.to_vec()))
    }

    async fn record_list(&self, kind: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .lock()
            .records
            .get(kind)
            .map(|records| records.values().map(|value| value.to_vec()).collect())
            .unwrap_or_default())
    }

    async fn record_delete(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        if let Some(records) = self.lock().records.get_mut(kind) {
            records.remove(id);
        }
        Ok(())
    }

    async fn record_put_new(&self, kind: &str, id: &str, value: &[u8]) -> Result<bool, StoreError> {
        Ok(self.record_put_new_many(kind, &[(id, value)]).await?[0])
    }

    async fn record_put_new_many(
        &self,
        kind: &str,
        new: &[(&str, &[u8])],
    ) -> Result<Vec<bool>, StoreError> {
        Ok(self.lock().insert_new_many(kind, new))
    }

    async fn records_exist(&self, kind: &str, ids: &[&str]) -> Result<Vec<bool>, StoreError> {
        let inner = self.lock();
        let records = inner.records.get(kind);
        Ok(ids
            .iter()
            .map(|id| records.is_some_and(|r| r.contains_key(*id)))
            .collect())
    }

    async fn record_count(&self, kind: &str) -> Result<u64, StoreError> {
        Ok(self.lock().records.get(kind).map_or(0, |r| r.len() as u64))
    }

    async fn record_delete_kind(&self, kind: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.records.remove(kind);
        if let Some(capped) = inner.capped.get_mut(kind) {
            capped.order.clear();
        }
        Ok(())
    }

    fn bound_records(&self, kind: &str, max: usize) {
        let mut inner = self.lock();
        if !inner.capped.contains_key(kind) {
            inner.capped.insert(
                kind.to_owned(),
                Capped {
                    max: max.max(1),
                    order: VecDeque::new(),
                },
            );
        }
    }

    async fn queue_push(&self, queue: &str, items: &[QueueItem]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let queue = inner.queues.entry(queue.to_owned()).or_default();
        for item in items {
            queue.payloads.insert(item.id.clone(), item.payload.clone());
            if queue.leased.contains_key(&item.id) || queue.seq_of.contains_key(&item.id) {
                continue;
            }
            queue.next_seq += 1;
            let seq = queue.next_seq;
            queue.waiting.insert((seq, item.id.clone()));
            queue.seq_of.insert(item.id.clone(), seq);
        }
        Ok(())
    }

    async fn queue_lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(queue) = inner.queues.get_mut(queue) else {
            return Ok(Vec::new());
        };
        queue.requeue_expired(now);
        let mut leased = Vec::new();
        while leased.len() < max {
            let Some((_, id)) = queue.waiting.pop_first() else {
                break;
            };
            queue.seq_of.remove(&id);
            queue.leased.insert(id.clone(), now + lease);
            let payload = queue.payloads.get(&id).cloned().unwrap_or_default();
            leased.push(QueueItem { id, payload });
        }
        Ok(leased)
    }

    async fn queue_release(&self, queue: &str, id: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(queue) = inner.queues.get_mut(queue) else {
            return Ok(false);
        };
        if queue.leased.remove(id).is_none() {
            return Ok(false);
        }
        queue.waiting.insert((0, id.to_owned()));
        queue.seq_of.insert(id.to_owned(), 0);
        Ok(true)
    }

    async fn queue_extend(
        &self,
        queue: &str,
        id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(queue) = inner.queues.get_mut(queue) else {
            return Ok(false);
        };
        match queue.leased.get_mut(id) {
            // A lease that ran out is the queue's again (another worker may take it).
            Some(deadline) if *deadline > now => {
                *deadline = now + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn queue_ack(&self, name: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self.queue_ack_many(name, &[id]).await? == 1)
    }

    async fn queue_ack_many(&self, name: &str, ids: &[&str]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let Some(queue) = inner.queues.get_mut(name) else {
            return Ok(0);
        };
        let mut found = 0;
        for id in ids {
            let was_leased = queue.leased.remove(*id).is_some();
            let was_waiting = queue.remove_waiting(id);
            queue.payloads.remove(*id);
            found += u64::from(was_leased || was_waiting);
        }
        if queue.payloads.is_empty() && queue.leased.is_empty() && queue.waiting.is_empty() {
            inner.queues.remove(name);
        }
        Ok(found)
    }

    async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, StoreError> {
        let now = Instant::now();
        let inner = self.lock();
        let Some(queue) = inner.queues.get(queue) else {
            return Ok(QueueCounts::default());
        };
        let expired = queue.leased.values().filter(|d| **d <= now).count() as u64;
        Ok(QueueCounts {
            waiting: queue.waiting.len() as u64 + expired,
            leased: queue.leased.len() as u64 - expired,
        })
    }

    async fn queue_drop_waiting(&self, queue: &str) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(queue) = inner.queues.get_mut(queue) else {
            return Ok(0);
        };
        queue.requeue_expired(now);
        let dropped = std::mem::take(&mut queue.waiting);
        for (_, id) in &dropped {
            queue.seq_of.remove(id);
            queue.payloads.remove(id);
        }
        Ok(dropped.len() as u64)
    }

    async fn account_hold(&self, hold: &HoldRequest<'_>) -> Result<HoldOutcome, StoreError> {
        let mut inner = self.lock();
        Ok(inner
            .accounts
            .entry(hold.account.to_owned())
            .or_default()
            .hold(hold))
    }

    async fn account_settle(
        &self,
        settle: &SettleRequest<'_>,
    ) -> Result<SettleOutcome, StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut forgotten = Vec::new();
        let outcome = inner
            .accounts
            .entry(settle.account.to_owned())
            .or_default()
            .settle(settle, &mut forgotten);
        for id in forgotten {
            if inner
                .settled_in
                .get(&id)
                .is_some_and(|a| a == settle.account)
            {
                inner.settled_in.remove(&id);
            }
        }
        if matches!(outcome, SettleOutcome::Settled { .. }) {
            inner
                .settled_in
                .insert(settle.request_id.to_owned(), settle.account.to_owned());
        }
        Ok(outcome)
    }

    async fn account_forget_settled(&self, request_ids: &[&str]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for id in request_ids {
            if let Some(account) = inner.settled_in.remove(*id)
                && let Some(book) = inner.accounts.get_mut(&account)
            {
                book.forget_settled(id);
            }
        }
        Ok(())
    }

    async fn account_release(&self, account: &str, request_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .accounts
            .get_mut(account)
            .is_some_and(|book| book.release(request_id)))
    }

    async fn account_credit(
        &self,
        account: &str,
        delta: i64,
        min_balance: i64,
        max_balance: i64,
        entry: &[u8],
    ) -> Result<CreditOutcome, StoreError> {
        let mut inner = self.lock();
        Ok(inner
            .accounts
            .entry(account.to_owned())
            .or_default()
            .credit(delta, min_balance, max_balance, entry))
    }

    async fn account_credits(&self, account: &str) -> Result<Vec<CreditRecord>, StoreError> {
        Ok(self
            .lock()
            .accounts
            .get(account)
            .map(Book::credits)
            .unwrap_or_default())
    }

    async fn account_money(
        &self,
        account: &str,
        now_ms: u64,
        periods: &[String],
    ) -> Result<Money, StoreError> {
        let mut inner = self.lock();
        Ok(match inner.accounts.get_mut(account) {
            Some(book) => book.money(now_ms, periods),
            None => Money {
                periods: vec![0; periods.len()],
                ..Money::default()
            },
        })
    }

    async fn publish(&self, event: &StoreEvent) -> Result<(), StoreError> {
        // No subscriber is not an error: nobody needed to hear it.
        let _ = self.events.send(event.clone());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys that expired are gone from memory once later writes come, not only dead when read:
    /// a key per request with a TTL must not pile up for good.
    #[tokio::test]
    async fn expired_keys_leave_memory_as_new_keys_come() {
        let store = MemoryStore::new();
        for i in 0..100 {
            let key = format!("charged:r{i}");
            store
                .kv_reserve(&key, 1, 1, Some(Duration::from_millis(1)))
                .await
                .unwrap();
        }
        store
            .kv_set("kept", b"1", Some(Duration::from_secs(3600)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        for i in 0..20 {
            store.kv_incr(&format!("n{i}"), 1, None).await.unwrap();
        }
        let inner = store.lock();
        assert_eq!(inner.kv.len(), 21, "the 100 expired keys are gone");
        assert!(inner.kv.contains_key("kept"));
        assert!(inner.expiries.len() <= 1, "{}", inner.expiries.len());
    }

    fn settlement<'a>(account: &'a str, request_id: &'a str, now_ms: u64) -> SettleRequest<'a> {
        SettleRequest {
            account,
            request_id,
            charge: 10,
            now_ms,
            periods: &[],
            remember_until_ms: now_ms + 1000,
        }
    }

    /// An account's mark of a request as settled goes when the ledger says its entry is
    /// written, and with it every trace of the id; one whose time ran out goes too. Ids the
    /// store never settled, or settled in another account, are left alone.
    #[tokio::test]
    async fn a_forgotten_settlement_leaves_nothing_behind() {
        let store = MemoryStore::new();
        let settled = |outcome: SettleOutcome| matches!(outcome, SettleOutcome::Settled { .. });
        for i in 0..100 {
            let id = format!("r{i}");
            assert!(settled(
                store
                    .account_settle(&settlement("a", &id, 0))
                    .await
                    .unwrap()
            ));
        }
        assert!(settled(
            store
                .account_settle(&settlement("b", "other", 0))
                .await
                .unwrap()
        ));
        assert_eq!(
            store
                .account_settle(&settlement("a", "r7", 1))
                .await
                .unwrap(),
            SettleOutcome::AlreadySettled,
            "remembered until forgotten"
        );
        let ids: Vec<String> = (0..100).map(|i| format!("r{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        store.account_forget_settled(&ids).await.unwrap();
        store
            .account_forget_settled(&["never-settled", "r1"])
            .await
            .unwrap();
        {
            let inner = store.lock();
            assert_eq!(inner.accounts["a"].settled_len(), (0, 0));
            assert_eq!(
                inner.accounts["b"].settled_len(),
                (1, 1),
                "b's own mark stays"
            );
            assert_eq!(inner.settled_in.len(), 1);
        }
        // Time runs out for b's mark when b next settles: no index entry is left behind.
        assert!(settled(
            store
                .account_settle(&settlement("b", "late", 5000))
                .await
                .unwrap()
        ));
        let inner = store.lock();
        assert_eq!(inner.accounts["b"].settled_len(), (1, 1));
        assert_eq!(inner.settled_in.keys().collect::<Vec<_>>(), ["late"]);
    }

    /// A key deleted, or given another expiry, leaves nothing behind: the ledger drops the
    /// meter's mark of each charged request once its entry is written, a key per request.
    #[tokio::test]
    async fn a_deleted_or_rewritten_key_leaves_nothing_behind() {
        let store = MemoryStore::new();
        let hour = Some(Duration::from_secs(3600));
        for i in 0..1000 {
            let key = format!("charged:r{i}");
            assert_eq!(store.kv_reserve(&key, 1, 1, hour).await.unwrap(), Some(1));
            store.kv_delete(&key).await.unwrap();
        }
        store.kv_set("moved", b"a", hour).await.unwrap();
        store
            .kv_set("moved", b"b", Some(Duration::from_secs(60)))
            .await
            .unwrap();
        store.kv_set("moved", b"c", None).await.unwrap();
        store.kv_set("kept", b"1", hour).await.unwrap();
        {
            let inner = store.lock();
            assert_eq!(inner.kv.len(), 2);
            assert_eq!(inner.expiries.len(), 1, "only `kept` expires");
            assert_eq!(&*inner.expiries.first().unwrap().1, "kept");
        }
        // An expired key read is gone from both.
        store
            .kv_set("brief", b"1", Some(Duration::from_nanos(1)))
            .await
            .unwrap();
        let expired = Instant::now() + Duration::from_millis(1);
        while Instant::now() < expired {
            std::hint::spin_loop();
        }
        assert_eq!(store.kv_get("brief").await.unwrap(), None);
        assert_eq!(store.lock().expiries.len(), 1);
        assert_eq!(
            store.kv_get("moved").await.unwrap().as_deref(),
            Some(&b"c"[..])
        );
    }

    /// Not a test: what each per-request structure costs in this store, in resident bytes per
    /// request (`cargo test -p garage-gateway --lib -- --ignored --nocapture
    /// bytes_per_request`). Linux only (reads /proc/self/statm).
    #[tokio::test]
    #[ignore = "a measurement, run by hand"]
    async fn bytes_per_request() {
        fn rss() -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        const N: usize = 200_000;
        let id = |i: usize| format!("019ab2c4-7e1f-7c3a-9d2e-{i:012x}");
        // An encoded ledger entry is about 150 bytes (ledger::tests' pinned entry).
        let entry = vec![7u8; 150];
        let store = MemoryStore::new();
        let measure = |what: &str, before: usize| {
            let after = rss();
            println!(
                "{what}: {} bytes per request",
                after.saturating_sub(before) / N
            );
            after
        };
        let start = rss();
        for i in 0..N {
            let key = format!("plugin:meter:charged:{}", id(i));
            store
                .kv_reserve(&key, 1, 1, Some(Duration::from_secs(3600)))
                .await
                .unwrap();
        }
        let at = measure("meter's charged mark (kv with a TTL)", start);
        store.cap_records("ledger", N);
        for i in 0..N {
            store
                .record_put_new_many("ledger", &[(&id(i), &entry)])
                .await
                .unwrap();
        }
        let at = measure("ledger entry (capped record, 150-byte value)", at);
        store.bound_records("export", N);
        for i in 0..N {
            store
                .record_put_new_many("export", &[(&id(i), &entry)])
                .await
                .unwrap();
        }
        let at = measure("export copy (capped record, 150-byte value)", at);
        store.bound_records("export_ref", N);
        for i in 0..N {
            let reference = [&[0u8][..], id(i).as_bytes()].concat();
            store
                .record_put_new_many("export_ref", &[(&id(i), &reference)])
                .await
                .unwrap();
        }
        measure("export reference (capped record, the id as value)", at);
    }
}
