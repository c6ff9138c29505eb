//! Accounts and prepaid credits: top-ups and the credit ledger, holds at admission and
//! settlement at the charge, exact on the embedded store, on Redis (a server and a cluster) and
//! across replicas; period budgets at their boundaries (an injectable clock); and what a hostile
//! client or operator input does.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use garage_gateway::accounts::credits::CreditRequest;
use garage_gateway::accounts::{
    Accounts, AccountsConfig, Clock, Credits, HoldFor, MAX_MONEY, ManualClock, Period,
};
use garage_gateway::error::ApiError;
use garage_gateway::ledger::{Outcome, UsageEvent};
use garage_gateway::plugins::Price;
use garage_gateway::store::{
    ApiKeyRecord, CreditOutcome, HoldOutcome, HoldRequest, MemoryStore, RedisStore, SettleOutcome,
    SettleRequest, Store,
};
use serde_json::{Value, json};

// ---- the store's steps, the same on every store ---------------------------------------------

fn hold<'a>(
    account: &'a str,
    request_id: &'a str,
    amount: i64,
    now_ms: u64,
    caps: &'a [(String, i64)],
) -> HoldRequest<'a> {
    HoldRequest {
        account,
        request_id,
        amount,
        now_ms,
        expires_at_ms: now_ms + 60_000,
        caps,
    }
}

fn settle<'a>(
    account: &'a str,
    request_id: &'a str,
    charge: i64,
    now_ms: u64,
    periods: &'a [(String, u64)],
) -> SettleRequest<'a> {
    SettleRequest {
        account,
        request_id,
        charge,
        now_ms,
        periods,
        remember_until_ms: now_ms + 3_600_000,
    }
}

/// Every step of an account's money, with the answers both stores must give.
async fn money_steps(store: Arc<dyn Store>) {
    let a = "acct_steps";
    let none: &[(String, i64)] = &[];
    // Credits, within bounds, each with its ledger entry.
    let credit = |delta, entry: &'static [u8]| {
        let store = store.clone();
        async move {
            store
                .account_credit(a, delta, 0, MAX_MONEY, entry)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        credit(10_000_000, b"e1").await,
        CreditOutcome::Credited {
            balance: 10_000_000
        }
    );
    assert_eq!(
        credit(-20_000_000, b"no").await,
        CreditOutcome::Refused {
            balance: 10_000_000
        }
    );
    assert_eq!(
        credit(MAX_MONEY, b"no").await,
        CreditOutcome::Refused {
            balance: 10_000_000
        }
    );
    let ledger = store.account_credits(a).await.unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].balance_after, 10_000_000);
    assert_eq!(ledger[0].entry, b"e1");

    // Holds: covered, idempotent per request id, refused past the available balance.
    let now = 1_000;
    assert_eq!(
        store
            .account_hold(&hold(a, "r1", 4_000_000, now, none))
            .await
            .unwrap(),
        HoldOutcome::Held {
            available: 6_000_000
        }
    );
    assert_eq!(
        store
            .account_hold(&hold(a, "r1", 4_000_000, now, none))
            .await
            .unwrap(),
        HoldOutcome::Held {
            available: 6_000_000
        },
        "the same request holds once"
    );
    assert_eq!(
        store
            .account_hold(&hold(a, "r2", 7_000_000, now, none))
            .await
            .unwrap(),
        HoldOutcome::Insufficient {
            available: 6_000_000
        }
    );
    assert_eq!(
        store
            .account_hold(&hold(a, "r2", 6_000_000, now, none))
            .await
            .unwrap(),
        HoldOutcome::Held { available: 0 }
    );
    // Without a price nothing is held, and nothing is available.
    assert_eq!(
        store
            .account_hold(&hold(a, "r3", 0, now, none))
            .await
            .unwrap(),
        HoldOutcome::Insufficient { available: 0 }
    );
    let money = store.account_money(a, now, &[]).await.unwrap();
    assert_eq!(
        (money.balance, money.reserved, money.holds),
        (10_000_000, 10_000_000, 2)
    );

    // Settlement: debited once, the hold released, the periods counted.
    let periods = vec![("day:x".to_owned(), now + 86_400_000)];
    assert_eq!(
        store
            .account_settle(&settle(a, "r1", 3_000_000, now, &periods))
            .await
            .unwrap(),
        SettleOutcome::Settled {
            balance: 7_000_000,
            periods: vec![3_000_000]
        }
    );
    assert_eq!(
        store
            .account_settle(&settle(a, "r1", 3_000_000, now, &periods))
            .await
            .unwrap(),
        SettleOutcome::AlreadySettled
    );
    let money = store
        .account_money(a, now, &["day:x".to_owned(), "day:y".to_owned()])
        .await
        .unwrap();
    assert_eq!(
        (
            money.balance,
            money.reserved,
            money.spent,
            money.holds,
            money.periods
        ),
        (7_000_000, 6_000_000, 3_000_000, 1, vec![3_000_000, 0])
    );
    // Release: once.
    assert!(store.account_release(a, "r2").await.unwrap());
    assert!(!store.account_release(a, "r2").await.unwrap());
    assert!(!store.account_release("acct_nobody", "r2").await.unwrap());

    // Period caps count what is spent and what is held.
    let caps = vec![("day:x".to_owned(), 3_500_000)];
    assert_eq!(
        store
            .account_hold(&hold(a, "r4", 1_000_000, now, &caps))
            .await
            .unwrap(),
        HoldOutcome::OverCap {
            index: 0,
            spent: 3_000_000,
            reserved: 0
        }
    );
    assert_eq!(
        store
            .account_hold(&hold(a, "r4", 500_000, now, &caps))
            .await
            .unwrap(),
        HoldOutcome::Held {
            available: 6_500_000
        }
    );
    assert_eq!(
        store
            .account_hold(&hold(a, "r5", 0, now, &caps))
            .await
            .unwrap(),
        HoldOutcome::OverCap {
            index: 0,
            spent: 3_000_000,
            reserved: 500_000
        },
        "a request without a price is refused once spent and held reach the cap"
    );
    assert!(store.account_release(a, "r4").await.unwrap());

    // A hold runs out at its expiry, by the caller's clock.
    let mut expiring = hold(a, "r6", 1_000_000, now, none);
    expiring.expires_at_ms = now + 1_000;
    store.account_hold(&expiring).await.unwrap();
    let reserved = |at| {
        let store = store.clone();
        async move { store.account_money(a, at, &[]).await.unwrap().reserved }
    };
    assert_eq!(reserved(now + 999).await, 1_000_000);
    assert_eq!(reserved(now + 1_000).await, 0);
    // Settling after the hold ran out debits the charge, and releases nothing twice.
    assert_eq!(
        store
            .account_settle(&settle(a, "r6", 250_000, now + 2_000, &periods))
            .await
            .unwrap(),
        SettleOutcome::Settled {
            balance: 6_750_000,
            periods: vec![3_250_000]
        }
    );
    assert_eq!(reserved(now + 2_000).await, 0);

    // A settlement is remembered until its time: a retry after that debits again (the ledger
    // never retries that late).
    let later = now + 3_600_000;
    assert_eq!(
        store
            .account_settle(&settle(a, "r1", 1, later, &periods))
            .await
            .unwrap(),
        SettleOutcome::Settled {
            balance: 6_749_999,
            periods: vec![3_250_001]
        }
    );

    // Amounts past 2^53 micro-credits are not reached; large ones stay exact.
    let big = "acct_big";
    let credited = store
        .account_credit(big, MAX_MONEY, 0, MAX_MONEY, b"max")
        .await
        .unwrap();
    assert_eq!(credited, CreditOutcome::Credited { balance: MAX_MONEY });
    assert_eq!(
        store
            .account_hold(&hold(big, "r", MAX_MONEY - 1, now, none))
            .await
            .unwrap(),
        HoldOutcome::Held { available: 1 }
    );
    assert_eq!(
        store
            .account_settle(&settle(big, "r", 123_456_789_123_457, now, &periods))
            .await
            .unwrap(),
        SettleOutcome::Settled {
            balance: MAX_MONEY - 123_456_789_123_457,
            periods: vec![123_456_789_123_457]
        }
    );
}

/// Holds raced from several stores (replicas) for the last credits: exactly what fits is held.
async fn race_for_the_last_credit(stores: Vec<Arc<dyn Store>>) {
    let a = "acct_race";
    stores[0]
        .account_credit(a, 1_000_000, 0, MAX_MONEY, b"one credit")
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            tokio::spawn(async move {
                let id = format!("race-{i}");
                store
                    .account_hold(&HoldRequest {
                        account: a,
                        request_id: &id,
                        amount: 100_000,
                        now_ms: 1_000,
                        expires_at_ms: 61_000,
                        caps: &[],
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut held = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), HoldOutcome::Held { .. }) {
            held += 1;
        }
    }
    assert_eq!(held, 10, "one credit holds ten tenths, no more");
    let money = stores[1 % stores.len()]
        .account_money(a, 1_000, &[])
        .await
        .unwrap();
    assert_eq!(
        (money.balance, money.reserved, money.holds),
        (1_000_000, 1_000_000, 10)
    );
}

#[tokio::test]
async fn money_steps_on_the_memory_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    money_steps(store.clone()).await;
    race_for_the_last_credit(vec![store]).await;
}

#[tokio::test]
async fn money_steps_on_redis_and_two_replicas_racing() {
    let redis = RedisServer::start();
    money_steps(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
    let replicas: Vec<Arc<dyn Store>> = vec![
        Arc::new(RedisStore::connect(&redis.url()).await.unwrap()),
        Arc::new(RedisStore::connect(&redis.url()).await.unwrap()),
    ];
    race_for_the_last_credit(replicas).await;
}

/// An account's keys share a hash slot: every script runs on one node of a cluster.
#[tokio::test]
async fn money_steps_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    money_steps(Arc::new(RedisStore::connect(&cluster.url()).await.unwrap())).await;
}

// ---- accounts with a clock of their own -------------------------------------------------------

/// 2026-12-07 (a Monday) 21:59 UTC: 23:59 at UTC+2.
const MON_2359: u64 = 1_796_680_740_000;
const MINUTE: u64 = 60_000;

fn accounts_on(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Accounts {
    let config = AccountsConfig {
        utc_offset_minutes: 120,
        hold_secs: 600,
        ..AccountsConfig::default()
    };
    Accounts::new(store, config, clock)
}

async fn new_account(accounts: &Accounts, body: Value, credits: i64) -> String {
    let account = accounts
        .create(serde_json::from_value(body).unwrap())
        .await
        .unwrap();
    let top_up = CreditRequest {
        amount: Credits(credits),
        reason: "prepaid".into(),
    };
    accounts
        .credit(&account.id, top_up, "test", "req-test")
        .await
        .unwrap();
    account.id
}

async fn key_of(store: &dyn Store, account: &str) -> ApiKeyRecord {
    let key = ApiKeyRecord {
        id: format!("key_of_{account}"),
        name: "k".into(),
        hash: format!("hash_of_{account}"),
        prefix: "sk-".into(),
        allowed_models: None,
        metadata: Default::default(),
        created_at: 0,
        revoked_at: None,
        account: Some(account.to_owned()),
    };
    store.put_key(&key).await.unwrap();
    key
}

/// A request that can cost 0.02 credits: 10 prompt and 10 completion tokens at 1 per 1,000.
fn small_request() -> HoldFor {
    HoldFor {
        price: Some(Price {
            prompt_per_1k: 1.0,
            completion_per_1k: 1.0,
        }),
        prompt_tokens: 10,
        max_tokens: Some(10),
        choices: 1,
        generates: true,
    }
}

fn event(request_id: &str, key_id: &str, at_ms: u64) -> UsageEvent {
    serde_json::from_value(json!({
        "request_id": request_id, "key_id": key_id, "model": MODEL,
        "prompt_tokens": 10, "completion_tokens": 10, "cached_tokens": 0,
        "latency_ms": 5, "ttft_ms": 1, "backend": "a", "rig": "", "operator": "",
        "started_at_ms": at_ms, "finished_at_ms": at_ms, "batch": false,
    }))
    .unwrap()
}

fn charged(credits: f64) -> Result<Outcome, String> {
    Ok(Outcome {
        credits,
        ..Outcome::default()
    })
}

fn retry_after(result: Result<Option<garage_gateway::accounts::Hold>, ApiError>) -> Option<u64> {
    match result {
        Err(ApiError::TooManyRequests {
            code: "insufficient_quota",
            retry_after_secs,
            ..
        }) => retry_after_secs,
        other => panic!("expected 429 insufficient_quota, got {other:?}"),
    }
}

/// A budget of each period, spent a minute before the period ends: refused with `retry-after`
/// of that minute, admitted again at the boundary (local midnight at UTC+2, a Monday, the 1st);
/// the 50 % and 100 % alerts raised once each per period.
async fn period_budgets_reset_at_the_boundary(store: Arc<dyn Store>) {
    let clock = Arc::new(ManualClock::at(MON_2359));
    let accounts = accounts_on(store.clone(), clock.clone());
    let sunday_2359 = MON_2359 + 6 * 1440 * MINUTE;
    let dec31_2359 = MON_2359 + 24 * 1440 * MINUTE;
    for (period, before) in [
        (Period::Day, MON_2359),
        (Period::Week, sunday_2359),
        (Period::Month, dec31_2359),
    ] {
        clock.set(before);
        let budgets = json!({ period.as_str(): 1.0 });
        let account = new_account(
            &accounts,
            json!({"name": period.as_str(), "budgets": budgets, "alert_thresholds": [100, 50]}),
            100_000_000,
        )
        .await;
        let key = key_of(store.as_ref(), &account).await;
        let first = accounts.admit(&key, "r1", &small_request()).await.unwrap();
        assert_eq!(first.map(|h| h.amount), Some(20_000));
        let mut outcomes = vec![charged(1.0)];
        accounts
            .settle_events(&[&event("r1", &key.id, before)], &mut outcomes)
            .await;
        assert!(outcomes[0].is_ok());
        let refused = accounts.admit(&key, "r2", &small_request()).await;
        assert_eq!(retry_after(refused), Some(60), "{period:?}: a minute to go");
        // Still spent a second before the boundary.
        clock.set(before + MINUTE - 1_000);
        assert_eq!(
            retry_after(accounts.admit(&key, "r2", &small_request()).await),
            Some(1)
        );
        clock.set(before + MINUTE);
        let next = accounts.admit(&key, "r3", &small_request()).await.unwrap();
        assert!(next.is_some(), "{period:?}: a new period");
        // Spend the new period's budget too: its thresholds alert again, once.
        let mut outcomes = vec![charged(0.6), charged(0.6)];
        let (e4, e5) = (
            event("r4", &key.id, before + MINUTE),
            event("r5", &key.id, before + MINUTE),
        );
        accounts.settle_events(&[&e4, &e5], &mut outcomes).await;
        let alerts = accounts.alerts(&account).await.unwrap();
        let mut seen: Vec<(String, u32)> = alerts
            .iter()
            .map(|a| {
                (
                    a.period_name.clone().unwrap_or_default(),
                    a.threshold_percent.unwrap_or_default(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(seen.len(), 4, "{period:?}: {seen:?}");
        assert_eq!(
            seen.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
            [50, 100, 50, 100],
            "{seen:?}"
        );
        assert_ne!(seen[0].0, seen[2].0, "two periods");
    }
}

#[tokio::test]
async fn period_budgets_reset_at_the_boundary_on_the_memory_store() {
    period_budgets_reset_at_the_boundary(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn period_budgets_reset_at_the_boundary_on_redis() {
    let redis = RedisServer::start();
    period_budgets_reset_at_the_boundary(Arc::new(
        RedisStore::connect(&redis.url()).await.unwrap(),
    ))
    .await;
}

/// A hold whose request never ends (its replica died) runs out; a request that failed releases
/// its hold at once; a retried settlement debits once.
async fn holds_expire_and_retries_debit_once(store: Arc<dyn Store>) {
    let clock = Arc::new(ManualClock::at(MON_2359));
    let accounts = accounts_on(store.clone(), clock.clone());
    let account = new_account(&accounts, json!({"name": "expiry"}), 50_000).await;
    let key = key_of(store.as_ref(), &account).await;
    // 0.05 credits hold two requests of 0.02.
    let a = accounts.admit(&key, "a", &small_request()).await.unwrap();
    let b = accounts.admit(&key, "b", &small_request()).await.unwrap();
    assert!(a.is_some() && b.is_some());
    retry_after(accounts.admit(&key, "c", &small_request()).await);
    // `b` failed before producing usage: its hold goes now.
    accounts.release(b.as_ref().unwrap(), "b").await;
    assert!(accounts.admit(&key, "c", &small_request()).await.is_ok());
    // Ten minutes later (`hold_secs`) nothing is held any more.
    clock.advance(600_000);
    let money = store
        .account_money(&account, clock.now_ms(), &[])
        .await
        .unwrap();
    assert_eq!((money.reserved, money.holds), (0, 0));
    // The ledger hands `a`'s event over twice: debited once.
    for _ in 0..2 {
        let mut outcomes = vec![charged(0.012345)];
        accounts
            .settle_events(&[&event("a", &key.id, MON_2359)], &mut outcomes)
            .await;
        assert!(outcomes[0].is_ok());
    }
    let money = store
        .account_money(&account, clock.now_ms(), &[])
        .await
        .unwrap();
    assert_eq!(money.balance, 50_000 - 12_345);
    assert_eq!(money.spent, 12_345);
}

#[tokio::test]
async fn holds_expire_and_retries_debit_once_on_the_memory_store() {
    holds_expire_and_retries_debit_once(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn holds_expire_and_retries_debit_once_on_redis() {
    let redis = RedisServer::start();
    holds_expire_and_retries_debit_once(Arc::new(RedisStore::connect(&redis.url()).await.unwrap()))
        .await;
}

/// A new process on the same Redis (a new store connection, new accounts state) finds the
/// balance and the holds as they were, and settles the old process's requests exactly.
#[tokio::test]
async fn a_restart_on_the_same_redis_keeps_the_balance_and_the_holds() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::at(MON_2359));
    let (account, key) = {
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
        let accounts = accounts_on(store.clone(), clock.clone());
        let account = new_account(&accounts, json!({"name": "restart"}), 1_000_000).await;
        let key = key_of(store.as_ref(), &account).await;
        for id in ["x", "y"] {
            assert!(
                accounts
                    .admit(&key, id, &small_request())
                    .await
                    .unwrap()
                    .is_some()
            );
        }
        (account, key)
    };
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let accounts = accounts_on(store.clone(), clock.clone());
    let money = store
        .account_money(&account, clock.now_ms(), &[])
        .await
        .unwrap();
    assert_eq!(
        (money.balance, money.reserved, money.holds),
        (1_000_000, 40_000, 2)
    );
    let mut outcomes = vec![charged(0.015), charged(0.0)];
    accounts
        .settle_events(
            &[
                &event("x", &key.id, MON_2359),
                &event("y", &key.id, MON_2359),
            ],
            &mut outcomes,
        )
        .await;
    let money = store
        .account_money(&account, clock.now_ms(), &[])
        .await
        .unwrap();
    assert_eq!(
        (money.balance, money.reserved, money.holds),
        (985_000, 0, 0)
    );
    assert_eq!(accounts.credit_ledger(&account).await.unwrap().len(), 1);
}

// ---- through the gateway -----------------------------------------------------------------------

/// Credits per 1,000 tokens the meter asks in these tests: a completion token costs a
/// hundredth of a credit, so 50 of them cost half a credit.
fn meter_config() -> String {
    config_query(json!({"prices": {MODEL: {"prompt": 0.01, "completion": 10.0}}}))
}

/// Installs the default meter with the test prices on the gateway at `base`.
async fn price_requests(base: &str) {
    let (status, body) = upload_plugin(base, "meter", garage_plugins::METER, &meter_config()).await;
    assert_eq!(status, 200, "{body}");
}

async fn create_account(base: &str, body: Value) -> String {
    let (status, created) = admin_post(base, "/admin/accounts", body).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

/// `POST /admin/accounts/{id}/credits`, with an `Idempotency-Key` if given: status, body and
/// whether the answer was replayed.
async fn credit(base: &str, account: &str, body: Value, key: Option<&str>) -> (u16, Value, bool) {
    let mut request = client()
        .post(format!("{base}/admin/accounts/{account}/credits"))
        .bearer_auth(ADMIN)
        .json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("admin API answers");
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (status, response.json().await.unwrap_or_default(), replayed)
}

async fn account_key(base: &str, account: &str) -> String {
    create_key(base, json!({"name": "of the account", "account": account}))
        .await
        .1
}

async fn account(base: &str, id: &str) -> Value {
    admin_get(base, &format!("/admin/accounts/{id}")).await
}

/// A streamed chat request asking for `max_tokens`: status, request id, body.
async fn stream(base: &str, key: &str, max_tokens: u64) -> (u16, String, String) {
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, id, response.text().await.unwrap_or_default())
}

/// What the ledger charged a request, in micro-credits, as the account is debited.
async fn charge_of(base: &str, request_id: &str) -> i64 {
    let entry = ledger_entry_within(base, request_id, Duration::from_secs(20)).await;
    let credits = entry["outcome"]["credits"].as_f64().expect("credits");
    Credits::from_charge(credits).micro()
}

/// Waits until no request of the account holds anything.
async fn settled(base: &str, id: &str) -> Value {
    wait_until(Duration::from_secs(20), "every hold settled", || async {
        let account = account(base, id).await;
        account["holds"] == 0 && account["reserved_micro"] == 0
    })
    .await;
    account(base, id).await
}

/// Twenty-four streams of half a credit each, raced through `bases` against two credits: at
/// most three are admitted (each holds a little more than half a credit: its prompt's bound
/// and its 50 completion tokens), the balance never goes below zero, and once all settle it is
/// the top-up minus the ledger's charges, to the micro-credit.
async fn concurrent_streams_never_overdraw(bases: &[String]) {
    let id = create_account(&bases[0], json!({"name": "small balance"})).await;
    let (status, _, _) = credit(
        &bases[0],
        &id,
        json!({"amount": "2", "reason": "prepaid"}),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let key = account_key(&bases[0], &id).await;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (base, key) = (bases[i % bases.len()].clone(), key.clone());
            tokio::spawn(async move { stream(&base, &key, 50).await })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        let (status, id, body) = task.await.unwrap();
        match status {
            200 => {
                assert!(body.contains("data: [DONE]"), "{body}");
                admitted.push(id);
            }
            429 => {
                let error = error_of(&body);
                assert_eq!(error["code"], "insufficient_quota", "{body}");
                assert_eq!(error["type"], "insufficient_quota", "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(
        (1..=3).contains(&admitted.len()),
        "{} admitted against two credits",
        admitted.len()
    );
    let after = settled(&bases[0], &id).await;
    let mut charges = 0;
    for id in &admitted {
        charges += charge_of(&bases[0], id).await;
    }
    let balance = after["balance_micro"].as_i64().expect("balance");
    assert!(balance >= 0, "overdrawn: {after}");
    assert_eq!(balance, 2_000_000 - charges, "{after}");
    assert_eq!(after["spent_micro"].as_i64(), Some(charges));
    // Every replica sees the same money.
    for base in bases {
        assert_eq!(account(base, &id).await["balance_micro"], balance);
    }
    // What is left does not cover another such request.
    let (status, _, body) = stream(&bases[0], &key, 50).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        error_of(&body)["message"].as_str().unwrap().starts_with(
            "You exceeded your current quota, please check your plan and billing details."
        ),
        "{body}"
    );
}

#[tokio::test]
async fn concurrent_streams_never_overdraw_on_the_memory_store() {
    let engine = paced_sim(200.0).await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    price_requests(&gw.url()).await;
    concurrent_streams_never_overdraw(&[gw.url()]).await;
}

fn on_redis(redis: &RedisServer, engine: &garage_sim_engine::SimEngine) -> garage_gateway::Config {
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("shared-replica-secret".into());
    cfg
}

#[tokio::test]
async fn concurrent_streams_never_overdraw_on_redis() {
    let redis = RedisServer::start();
    let engine = paced_sim(200.0).await;
    let gw = gateway(on_redis(&redis, &engine)).await;
    price_requests(&gw.url()).await;
    concurrent_streams_never_overdraw(&[gw.url()]).await;
}

/// Waits until the gateway at `base` prices requests with the meter another replica installed.
async fn same_meter(bases: &[String]) {
    let active = |base: String| async move {
        admin_get(&base, "/admin/plugins").await["data"]
            .as_array()
            .and_then(|slots| slots.iter().find(|s| s["slot"] == "meter").cloned())
            .map(|meter| meter["active"]["sha256"].clone())
    };
    let first = active(bases[0].clone()).await.expect("a meter");
    for base in &bases[1..] {
        wait_until(
            Duration::from_secs(10),
            "the meter on every replica",
            || {
                let (base, first) = (base.clone(), first.clone());
                async move { active(base).await == Some(first) }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn concurrent_streams_never_overdraw_across_two_replicas_on_one_redis() {
    let redis = RedisServer::start();
    let engine = paced_sim(200.0).await;
    let a = gateway(on_redis(&redis, &engine)).await;
    let b = gateway(on_redis(&redis, &engine)).await;
    let bases = [a.url(), b.url()];
    price_requests(&bases[0]).await;
    same_meter(&bases).await;
    concurrent_streams_never_overdraw(&bases).await;
}

#[tokio::test]
async fn top_ups_and_adjustments_make_the_credit_ledger() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let id = create_account(
        &base,
        json!({"name": "Acme <b>", "metadata": {"customer": 42}, "budgets": {"month": 100}}),
    )
    .await;
    let (status, first, _) = credit(
        &base,
        &id,
        json!({"amount": 12.5, "reason": "invoice 2026-001"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["amount"], 12.5);
    assert_eq!(first["balance_after_micro"], 12_500_000);
    assert_eq!(first["reason"], "invoice 2026-001");
    let by = first["by"].as_str().unwrap();
    assert!(by.starts_with("admin_token:") && by.len() == 20, "{by}");
    assert!(!by.contains(ADMIN));
    assert!(first["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    let (status, second, _) = credit(
        &base,
        &id,
        json!({"amount": "-0.25", "reason": "goodwill correction"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["balance_after"], 12.25);
    let ledger = admin_get(&base, &format!("/admin/accounts/{id}/credits")).await;
    let entries = ledger["data"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["id"], first["id"]);
    assert_eq!(entries[1]["amount_micro"], -250_000);
    assert!(entries[0]["created_at_ms"].as_u64() <= entries[1]["created_at_ms"].as_u64());
    let shown = account(&base, &id).await;
    assert_eq!(shown["balance"], 12.25);
    assert_eq!(shown["available_micro"], 12_250_000);
    assert_eq!(shown["name"], "Acme <b>");
    assert_eq!(shown["budgets"]["month"], 100.0);
    assert_eq!(shown["periods"].as_array().unwrap().len(), 3);
    let listed = admin_get(&base, "/admin/accounts").await;
    assert_eq!(listed["data"][0]["balance_micro"], 12_250_000);
    // The key's account is on the key.
    let (key_id, _) = create_key(&base, json!({"name": "k", "account": id})).await;
    assert_eq!(
        admin_get(&base, &format!("/admin/keys/{key_id}")).await["account"],
        id
    );
    assert_eq!(account(&base, &id).await["keys"][0]["id"], key_id);
}

/// A top-up retried with its `Idempotency-Key` (through the other replica) credits once and
/// answers the first entry again; the key with another amount is refused.
#[tokio::test]
async fn a_retried_top_up_credits_once() {
    let redis = RedisServer::start();
    let engine = fast_sim().await;
    let a = gateway(on_redis(&redis, &engine)).await;
    let b = gateway(on_redis(&redis, &engine)).await;
    let id = create_account(&a.url(), json!({"name": "retry"})).await;
    let body = json!({"amount": "5", "reason": "payment 17"});
    let (status, first, replayed) = credit(&a.url(), &id, body.clone(), Some("pay-17")).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let (status, again, replayed) = credit(&b.url(), &id, body, Some("pay-17")).await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, first);
    let (status, reused, _) = credit(
        &b.url(),
        &id,
        json!({"amount": "6", "reason": "payment 17"}),
        Some("pay-17"),
    )
    .await;
    assert_eq!(status, 400, "{reused}");
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");
    let shown = account(&a.url(), &id).await;
    assert_eq!(shown["balance_micro"], 5_000_000);
    let ledger = admin_get(&b.url(), &format!("/admin/accounts/{id}/credits")).await;
    assert_eq!(ledger["data"].as_array().unwrap().len(), 1);
    // A restarted gateway on the same Redis finds the same balance and ledger.
    drop((a, b));
    let c = gateway(on_redis(&redis, &engine)).await;
    assert_eq!(account(&c.url(), &id).await["balance_micro"], 5_000_000);
}

/// A key of its own (no account) is served and charged as before: nothing is held or refused
/// for money, and its key shows no account.
#[tokio::test]
async fn a_key_without_an_account_behaves_as_before() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    price_requests(&base).await;
    let (key_id, key) = create_key(&base, json!({"name": "own"})).await;
    for max_tokens in [5, 1_000_000] {
        let (status, id, body) = stream(&base, &key, max_tokens).await;
        if max_tokens == 5 {
            assert_eq!(status, 200, "{body}");
            assert!(
                charge_of(&base, &id).await > 0,
                "still charged by the meter"
            );
        } else {
            // The engine's own refusal of a context it cannot hold, not a quota.
            assert_eq!(status, 400, "{body}");
        }
    }
    assert_eq!(
        admin_get(&base, &format!("/admin/keys/{key_id}")).await["account"],
        Value::Null
    );
}

/// Bad amounts and reasons are 400s in OpenAI's shape; unknown accounts 404; a key cannot be
/// given to an account that does not exist, and a key whose account disappeared is refused.
#[tokio::test]
async fn hostile_amounts_accounts_and_keys_are_refused() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let id = create_account(&base, json!({"name": "target"})).await;
    for (amount, why) in [
        (json!("NaN"), "NaN"),
        (json!("Infinity"), "infinity"),
        (json!(1e300), "huge"),
        (json!("1000000001"), "past a billion"),
        (json!(0), "zero"),
        (json!("0.0000001"), "below a micro-credit"),
        (json!("1,5"), "a comma"),
        (json!(null), "null"),
        (json!([1]), "a list"),
        (json!(-1), "below a zero balance"),
    ] {
        let (status, body, _) =
            credit(&base, &id, json!({"amount": amount, "reason": "x"}), None).await;
        assert_eq!(status, 400, "{why}: {body}");
        error_of(&body.to_string());
    }
    for body in [
        json!({"amount": 1}),
        json!({"amount": 1, "reason": ""}),
        json!({"amount": 1, "reason": "a\u{7}bell"}),
        json!({"amount": 1, "reason": "x".repeat(501)}),
        json!({"amount": 1, "reason": "x", "extra": true}),
    ] {
        let (status, answer, _) = credit(&base, &id, body.clone(), None).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    // A balance can be topped up to a billion, not past it.
    let (status, _, _) = credit(
        &base,
        &id,
        json!({"amount": "1000000000", "reason": "max"}),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let (status, body, _) = credit(
        &base,
        &id,
        json!({"amount": "0.000001", "reason": "one more"}),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("balance_out_of_range"))
    );
    assert_eq!(account(&base, &id).await["balance_micro"], MAX_MONEY);

    for (method, path) in [
        ("GET", "/admin/accounts/acct_nope"),
        ("GET", "/admin/accounts/acct_nope/credits"),
        ("DELETE", "/admin/accounts/acct_nope"),
        ("PUT", "/admin/accounts/acct_nope/keys/key_nope"),
        ("DELETE", "/admin/accounts/acct_nope/keys/key_nope"),
    ] {
        let response = client()
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        error_of(&response.text().await.unwrap());
    }
    let (status, body, _) = credit(
        &base,
        "acct_nope",
        json!({"amount": 1, "reason": "x"}),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    // Without the admin token: 401.
    let response = client()
        .get(format!("{base}/admin/accounts"))
        .bearer_auth("sk-not-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Bad accounts.
    for body in [
        json!({"name": ""}),
        json!({"name": "x", "budgets": {"day": 0}}),
        json!({"name": "x", "budgets": {"fortnight": 1}}),
        json!({"name": "x", "alert_thresholds": [0]}),
        json!({"name": "x", "alert_thresholds": [101]}),
        json!({"name": "x", "low_balance_alert": -1}),
    ] {
        let (status, answer) = admin_post(&base, "/admin/accounts", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }

    // A key for an account that is not there.
    let (status, body) = admin_post(
        &base,
        "/admin/keys",
        json!({"name": "k", "account": "acct_nope"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "account_not_found");
    // A key whose account record is gone (a store edited by hand): refused, never free.
    let (key_id, key) = create_key(&base, json!({"name": "orphan", "account": id})).await;
    gw.state()
        .store()
        .record_delete(garage_gateway::store::keyspace::ACCOUNTS, &id)
        .await
        .unwrap();
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_of(&body)["code"], "account_not_found");
    // Taking the key from an account it is not in: 404.
    let other = create_account(&base, json!({"name": "other"})).await;
    let response = client()
        .delete(format!("{base}/admin/accounts/{other}/keys/{key_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

/// A client asking for a huge `max_tokens` is refused (it could cost more than the account
/// has), not given a hold of everything: the account is untouched and serves the next request.
/// Why refused and not capped: a hold smaller than what the answer may cost could be overdrawn.
#[tokio::test]
async fn a_huge_max_tokens_cannot_grab_the_balance() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    price_requests(&base).await;
    let id = create_account(&base, json!({"name": "grab"})).await;
    credit(&base, &id, json!({"amount": 3, "reason": "prepaid"}), None).await;
    let key = account_key(&base, &id).await;
    for max_tokens in [1_000_000_u64, u64::from(u32::MAX)] {
        let (status, _, body) = stream(&base, &key, max_tokens).await;
        assert_eq!(status, 429, "{body}");
        let error = error_of(&body);
        assert_eq!(error["code"], "insufficient_quota");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("lower max_tokens"),
            "{body}"
        );
    }
    let shown = account(&base, &id).await;
    assert_eq!(
        (shown["reserved_micro"].as_i64(), shown["holds"].as_u64()),
        (Some(0), Some(0))
    );
    let (status, _, body) = stream(&base, &key, 50).await;
    assert_eq!(status, 200, "{body}");
}

/// A closed account's keys are refused and it takes no top-ups; what is left can be refunded.
#[tokio::test]
async fn a_closed_account_is_refused() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let id = create_account(&base, json!({"name": "leaving"})).await;
    credit(&base, &id, json!({"amount": 3, "reason": "prepaid"}), None).await;
    let key = account_key(&base, &id).await;
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    let response = client()
        .delete(format!("{base}/admin/accounts/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_of(&body)["code"], "account_closed");
    let (status, _, _) = credit(&base, &id, json!({"amount": 1, "reason": "more"}), None).await;
    assert_eq!(status, 409);
    let (status, body, _) =
        credit(&base, &id, json!({"amount": -3, "reason": "refund"}), None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["balance_after_micro"], 0);
    let (status, body) =
        admin_post(&base, "/admin/keys", json!({"name": "k", "account": id})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("account_closed"))
    );
}

/// With a meter that quotes nothing (one of `garage:policy@0.4.0`), nothing is held: a request
/// is admitted while the balance is positive, may overdraw it by its own cost, and the next is
/// refused.
#[tokio::test]
async fn without_a_quote_a_positive_balance_admits() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (status, body) =
        upload_plugin(&base, "meter", garage_plugins::fixtures::METER_V0_4, "").await;
    assert_eq!(status, 200, "{body}");
    let id = create_account(&base, json!({"name": "unquoted"})).await;
    credit(
        &base,
        &id,
        json!({"amount": "0.001", "reason": "a little"}),
        None,
    )
    .await;
    let key = account_key(&base, &id).await;
    // 1 credit per 1,000 tokens: 40 completion tokens and the prompt cost more than 0.001.
    let (status, request, body) = stream(&base, &key, 40).await;
    assert_eq!(status, 200, "{body}");
    let charge = charge_of(&base, &request).await;
    let after = settled(&base, &id).await;
    assert_eq!(after["balance_micro"].as_i64(), Some(1_000 - charge));
    assert!(after["balance_micro"].as_i64() < Some(0), "{after}");
    let (status, _, body) = stream(&base, &key, 40).await;
    assert_eq!(status, 429, "{body}");
}

/// A daily budget through the gateway: spent, the key is refused until local midnight
/// (`retry-after`), and the account shows the day's spend and its alerts.
#[tokio::test]
async fn a_spent_daily_account_budget_waits_for_local_midnight() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    let offset_minutes: u64 = 180;
    cfg.accounts.utc_offset_minutes = offset_minutes as i32;
    cfg.webhooks.poll_interval_ms = 20;
    let gw = gateway(cfg).await;
    let base = gw.url();
    price_requests(&base).await;
    let hooks = Hooks::start().await;
    let (status, body) = admin_post(
        &base,
        "/admin/webhooks",
        json!({"url": hooks.url, "events": ["budget.threshold", "balance.low"]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = create_account(
        &base,
        json!({
            "name": "daily", "budgets": {"day": 0.6}, "alert_thresholds": [50, 80, 100],
            "low_balance_alert": 99.9,
        }),
    )
    .await;
    credit(
        &base,
        &id,
        json!({"amount": 100, "reason": "prepaid"}),
        None,
    )
    .await;
    let key = account_key(&base, &id).await;
    // Half a credit each: the first fits, the second would pass 0.6 once the first settles.
    let (status, first, _) = stream(&base, &key, 50).await;
    assert_eq!(status, 200);
    charge_of(&base, &first).await;
    settled(&base, &id).await;
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = response.text().await.unwrap();
    assert_eq!(error_of(&body)["code"], "insufficient_quota");
    const DAY_MS: u64 = 86_400_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let to_midnight = (DAY_MS - (now + offset_minutes * 60_000) % DAY_MS).div_ceil(1000);
    assert!(
        retry_after.abs_diff(to_midnight) <= 5,
        "retry-after {retry_after} s, local midnight in {to_midnight} s"
    );
    let shown = account(&base, &id).await;
    let day = &shown["periods"][0];
    assert_eq!(day["period"], "day");
    assert!(day["spent_micro"].as_i64() > Some(500_000), "{shown}");
    let mut thresholds: Vec<u64> = shown["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["threshold_percent"].as_u64())
        .collect();
    thresholds.sort();
    assert_eq!(thresholds, [50, 80], "{shown}");
    // The same alerts as webhook events, once each: two budget thresholds, a low balance.
    wait_until(
        Duration::from_secs(10),
        "three alert deliveries",
        || async { hooks.events().len() >= 3 },
    )
    .await;
    let events = hooks.events();
    let mut kinds: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["data"]["threshold_percent"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("dev.garage.balance.low".to_owned(), 0),
            ("dev.garage.budget.threshold".to_owned(), 50),
            ("dev.garage.budget.threshold".to_owned(), 80),
        ],
        "{events:?}"
    );
    let budget = events
        .iter()
        .find(|e| e["data"]["threshold_percent"] == 80)
        .unwrap();
    assert_eq!(budget["subject"], id);
    assert_eq!(budget["data"]["scope"], "account");
    assert_eq!(budget["data"]["period"], "day");
    assert_eq!(budget["data"]["budget"], 0.6);
}

/// A webhook receiver on loopback that keeps the CloudEvents it is sent.
struct Hooks {
    url: String,
    received: Arc<std::sync::Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hooks {
    async fn start() -> Hooks {
        let received: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
        let log = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let log = log.clone();
                async move {
                    if let Ok(event) = serde_json::from_slice(&body) {
                        log.lock().unwrap().push(event);
                    }
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Hooks {
            url,
            received,
            task,
        }
    }

    /// Each event once (a receiver may be sent one again; its id says so).
    fn events(&self) -> Vec<Value> {
        let mut events = self.received.lock().unwrap().clone();
        events.sort_by_key(|e| e["id"].to_string());
        events.dedup_by_key(|e| e["id"].to_string());
        events
    }
}

/// Budgets and alerts can be changed; a budget of a period that is not one is refused.
#[tokio::test]
async fn an_account_can_be_changed() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let id = create_account(&base, json!({"name": "before", "low_balance_alert": 1})).await;
    let patch = |body: Value| {
        let base = base.clone();
        let id = id.clone();
        async move {
            let response = client()
                .patch(format!("{base}/admin/accounts/{id}"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, changed) = patch(json!({
        "name": "after", "budgets": {"week": 7}, "alert_thresholds": [80, 50, 80],
        "low_balance_alert": null,
    }))
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["name"], "after");
    assert_eq!(changed["budgets"], json!({"week": 7.0}));
    assert_eq!(changed["alert_thresholds"], json!([50, 80]));
    assert_eq!(changed["low_balance_alert"], Value::Null);
    let (status, _) = patch(json!({"budgets": {"week": -1}})).await;
    assert_eq!(status, 400);
    let (status, _) = patch(json!({"owner": "x"})).await;
    assert_eq!(status, 400);
}

/// The console's Accounts page: balances and what is reserved, a top-up form that a double
/// submission credits once, the credit ledger naming the console, forged forms refused, and an
/// account's name shown as text.
#[tokio::test]
async fn accounts_are_topped_up_in_the_console() {
    use crate::console::{browser, csrf_of, login, page};
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let id = create_account(&base, json!({"name": "<img src=x onerror=alert(1)>"})).await;
    let cookie = login(&base, ADMIN).await;
    let (status, html) = page(&base, "/console/accounts", &cookie).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );
    assert!(!html.contains("<img"), "{html}");
    assert!(html.contains(&id));
    let (status, html) = page(&base, &format!("/console/accounts/{id}"), &cookie).await;
    assert_eq!(status, 200);
    let csrf = csrf_of(&html);
    let once = {
        let at = html
            .find("name=\"idempotency_key\" value=\"")
            .expect("a one-time key")
            + 30;
        html[at..at + 24].to_owned()
    };
    let post = |form: Vec<(&'static str, String)>| {
        browser()
            .post(format!("{base}/console/accounts/{id}/credits"))
            .header("cookie", &cookie)
            .form(&form)
            .send()
    };
    let form = |amount: &str, csrf: &str| {
        vec![
            ("csrf", csrf.to_owned()),
            ("idempotency_key", once.clone()),
            ("amount", amount.to_owned()),
            ("reason", "paid by card".to_owned()),
        ]
    };
    let forged = post(form("2.5", &"0".repeat(64))).await.unwrap();
    assert_eq!(forged.status(), 403);
    let bad = post(form("NaN", &csrf)).await.unwrap();
    assert_eq!(bad.status(), 400);
    for _ in 0..2 {
        let done = post(form("2.5", &csrf)).await.unwrap();
        assert_eq!(done.status(), 200);
        assert!(done.text().await.unwrap().contains("Credited 2.5"));
    }
    let shown = account(&base, &id).await;
    assert_eq!(
        shown["balance_micro"], 2_500_000,
        "a form posted twice credits once"
    );
    let ledger = admin_get(&base, &format!("/admin/accounts/{id}/credits")).await;
    let entries = ledger["data"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0]["by"]
            .as_str()
            .unwrap()
            .starts_with("console:admin_token:")
    );
    let (_, html) = page(&base, &format!("/console/accounts/{id}"), &cookie).await;
    assert!(html.contains("paid by card"));
    // An account made in the console, with its budgets.
    let made = post_form(
        &base,
        &cookie,
        "/console/accounts",
        vec![
            ("csrf", csrf.clone()),
            ("name", "made here".into()),
            ("day", "5".into()),
            ("alert_thresholds", "50, 100".into()),
        ],
    )
    .await;
    assert_eq!(made, 200);
    let listed = admin_get(&base, "/admin/accounts").await;
    let made = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "made here")
        .cloned()
        .expect("the account made in the console");
    assert_eq!(made["budgets"]["day"], 5.0);
    assert_eq!(made["alert_thresholds"], json!([50, 100]));
}

async fn post_form(base: &str, cookie: &str, path: &str, form: Vec<(&str, String)>) -> u16 {
    crate::console::browser()
        .post(format!("{base}{path}"))
        .header("cookie", cookie)
        .form(&form)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Batch API lines are charged to the key's account as they complete, holding nothing: a batch
/// is made only while the account may spend, and its lines are leased to rigs only while it has
/// credits available; spent, the lines wait, and a top-up lets them go on. The balance is the
/// top-ups minus the lines' charges exactly.
#[tokio::test]
async fn batch_lines_are_charged_to_the_account_and_wait_while_it_has_nothing() {
    use crate::batch::{
        create_batch, enroll_by_hand, heartbeat, lines, node_post, upload_ok, wait_batch,
    };
    // The static upstream makes the model known to the batch API; it never runs batch lines.
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("static", engine.base_url())]);
    cfg.batch.max_wait_ms = 0;
    let gw = gateway(cfg).await;
    let base = gw.url();
    price_requests(&base).await;
    let empty = create_account(&base, json!({"name": "nothing yet"})).await;
    let (_, broke) = create_key(&base, json!({"name": "broke", "account": empty})).await;
    let file = upload_ok(&base, &broke, lines(1, 8)).await;
    let (status, body) = create_batch(&base, &broke, &file).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota");

    // 0.05 credits: less than one line (8 completion tokens cost 0.08).
    let id = create_account(&base, json!({"name": "batches"})).await;
    credit(
        &base,
        &id,
        json!({"amount": "0.05", "reason": "prepaid"}),
        None,
    )
    .await;
    let (_, key) = create_key(&base, json!({"name": "batch key", "account": id})).await;
    let file = upload_ok(&base, &key, lines(3, 8)).await;
    let (status, created) = create_batch(&base, &key, &file).await;
    assert_eq!(status, 200, "{created}");
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let rig = enroll_by_hand(&base, "batch-rig").await;
    node_post(&base, &rig, "/node/v1/heartbeat", heartbeat(MODEL)).await;
    let lease = |max: u64| {
        let (base, rig) = (base.clone(), rig.clone());
        async move {
            node_post(
                &base,
                &rig,
                "/node/v1/batch/lease",
                json!({"models": [MODEL], "max": max, "wait_ms": 0}),
            )
            .await["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
    };
    let answer = |items: Vec<Value>| {
        let (base, rig, batch_id) = (base.clone(), rig.clone(), batch_id.clone());
        async move {
            let results: Vec<Value> = items
                .iter()
                .map(|item| {
                    json!({
                        "batch_id": batch_id, "model": MODEL, "line": item["line"],
                        "status_code": 200, "latency_ms": 5,
                        "body": {"object": "chat.completion", "choices": [{"index": 0,
                            "message": {"role": "assistant", "content": "one two three four five six seven eight"},
                            "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}},
                    })
                })
                .collect();
            node_post(
                &base,
                &rig,
                "/node/v1/batch/results",
                json!({"results": results}),
            )
            .await
        }
    };
    let first = lease(1).await;
    assert_eq!(first.len(), 1, "the account has credits: a line");
    answer(first).await;
    wait_until(Duration::from_secs(20), "the line charged", || async {
        account(&base, &id).await["spent_micro"].as_i64() > Some(0)
    })
    .await;
    assert!(account(&base, &id).await["balance_micro"].as_i64() < Some(0));
    assert!(lease(10).await.is_empty(), "no credits: the lines wait");
    credit(&base, &id, json!({"amount": 1, "reason": "more"}), None).await;
    let rest = lease(10).await;
    assert_eq!(rest.len(), 2);
    answer(rest).await;
    assert_eq!(
        wait_batch(&base, &key, &batch_id, Duration::from_secs(30)).await["status"],
        "completed"
    );
    let mut charges = 0;
    for line in 1..=3 {
        charges += charge_of(&base, &format!("{batch_id}:{line}")).await;
    }
    assert!(charges > 0);
    wait_until(Duration::from_secs(20), "every line charged", || async {
        account(&base, &id).await["spent_micro"].as_i64() == Some(charges)
    })
    .await;
    assert_eq!(
        account(&base, &id).await["balance_micro"].as_i64(),
        Some(1_050_000 - charges)
    );
}
