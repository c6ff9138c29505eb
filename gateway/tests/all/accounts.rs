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

fn on_redis(redis: &RedisServer, engine: &garage_sim_engine::SimEngine) -> garage_gateway::Config {
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("shared-replica-secret".into());
    cfg
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
    use crate::batch::{create_batch, enroll_by_hand, heartbeat, lines, node_post, upload_ok, wait_batch};
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
    credit(&base, &id, json!({"amount": "0.05", "reason": "prepaid"}), None).await;
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
            node_post(&base, &rig, "/node/v1/batch/results", json!({"results": results})).await
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
