//! Payouts: a run pays every operator their points not paid yet; a run twice pays once, a
//! retry with its Idempotency-Key gets the first answer, and the operator sees their lines.

use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};

async fn leaderboard_points(base: &str, operator: &str) -> f64 {
    admin_get(base, "/admin/rewards").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["operator"] == operator)
        .map_or(0.0, |row| row["points"].as_f64().unwrap())
}

async fn run(base: &str, body: Value, idempotency: Option<&str>) -> (u16, bool, Value) {
    let mut request = client()
        .post(format!("{base}/admin/payouts"))
        .bearer_auth(ADMIN)
        .json(&body);
    if let Some(key) = idempotency {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let status = response.status().as_u16();
    (status, replayed, response.json().await.unwrap_or_default())
}

/// Serves `n` chat requests and waits until the operator's points are above `above` and stop
/// moving; answers them.
async fn earn(base: &str, key: &str, n: usize, above: f64) -> f64 {
    for _ in 0..n {
        let (status, body) = post_chat(base, key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_until(Duration::from_secs(20), "the points to settle", || async {
        let now = leaderboard_points(base, "op-test").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        now > above && now == leaderboard_points(base, "op-test").await
    })
    .await;
    leaderboard_points(base, "op-test").await
}

/// A gateway whose reward pays a rig's work though it is new and counted by itself (these
/// tests are about money), one rig of `op-test` named `rig` in routing, and an app's key.
async fn paying_gateway(
    rig: &str,
) -> (
    garage_gateway::Gateway,
    garage_node_runner::agent::Agent,
    String,
) {
    let mut cfg = config(vec![]);
    cfg.default_plugins = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let pays = config_query(
        json!({"verified_only": false, "gateway_counted_only": false, "points_per_uptime_hour": 0.0}),
    );
    let (status, body) = upload_plugin(&base, "reward", garage_plugins::REWARD, &pays).await;
    assert_eq!(status, 200, "{body}");
    let token = enrollment_token(&base, 1).await;
    let rig = sim_rig(rig_options(&base, rig, &token), 0.0).await;
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(10), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    (gw, rig, key)
}

#[tokio::test]
async fn a_payout_run_pays_each_point_once() {
    let (gw, rig, key) = paying_gateway("paid-rig").await;
    let base = gw.url();

    let (status, _, body) = run(&base, json!({"rate_per_point": 0.0}), None).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = run(
        &base,
        json!({"rate_per_point": 1.0, "currency": "U$D"}),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let earned = earn(&base, &key, 5, 0.0).await;
    let (status, _, first) = run(
        &base,
        json!({"rate_per_point": 0.5, "currency": "USD"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let line = &first["lines"][0];
    assert_eq!(line["operator"], "op-test", "{first}");
    assert!(
        (line["points"].as_f64().unwrap() - earned).abs() < 1e-6,
        "{first}"
    );
    assert!(
        (line["amount"].as_f64().unwrap() - earned * 0.5).abs() < 1e-6,
        "{first}"
    );
    // Nothing new earned: the next run pays nobody.
    let (status, _, second) = run(
        &base,
        json!({"rate_per_point": 0.5, "currency": "USD"}),
        None,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(second["lines"], json!([]), "{second}");
    // What is earned afterwards, and only that, is paid by the next run.
    let total = earn(&base, &key, 3, earned).await;
    let (_, replayed, third) = run(
        &base,
        json!({"rate_per_point": 0.5, "currency": "USD"}),
        Some("run-3"),
    )
    .await;
    assert!(!replayed);
    let paid = third["lines"][0]["points"].as_f64().unwrap();
    assert!((paid - (total - earned)).abs() < 1e-6, "{third}");
    // A retry with the run's Idempotency-Key: the same run, nothing paid again.
    let (status, replayed, retried) = run(
        &base,
        json!({"rate_per_point": 0.5, "currency": "USD"}),
        Some("run-3"),
    )
    .await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(retried["id"], third["id"]);
    let runs = admin_get(&base, "/admin/payouts").await;
    assert_eq!(runs["data"].as_array().unwrap().len(), 3, "{runs}");

    // The CSV of a run, and the operator's own view of what they were paid.
    let csv = client()
        .get(format!(
            "{base}/admin/payouts/{}/csv",
            first["id"].as_str().unwrap()
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        csv.starts_with("payout_id,created_at,operator,points"),
        "{csv}"
    );
    assert!(csv.contains(",op-test,") && csv.contains(",USD,"), "{csv}");
    let (status, operator) =
        admin_post(&base, "/admin/operators", json!({"name": "op-test"})).await;
    assert_eq!(status, 201, "{operator}");
    let own: Value = client()
        .get(format!("{base}/operator/v1/payouts"))
        .bearer_auth(operator["token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paid_in_all: f64 = own["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["points"].as_f64().unwrap())
        .sum();
    assert!((paid_in_all - total).abs() < 1e-6, "{own}");
    rig.shutdown().await;
}

async fn get_as(base: &str, token: &str, path: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Each line of a payout run traces to the requests that earned it: the statement of a run
/// lists the requests of its window (none of the run before), their points adding up to the
/// line's, each with the rig's verified receipt; the operator reads their own, another rig
/// owner sees nothing of it.
#[tokio::test]
async fn a_payout_line_traces_to_its_requests_and_their_receipts() {
    let (gw, _rig, key) = paying_gateway("traced-rig").await;
    let base = gw.url();

    let earned = earn(&base, &key, 4, 0.0).await;
    let (_, _, first) = run(&base, json!({"rate_per_point": 0.5}), None).await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let statement = admin_get(
        &base,
        &format!("/admin/payouts/{first_id}/statements/op-test"),
    )
    .await;
    let requests = statement["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 4, "{statement}");
    let listed: f64 = requests.iter().map(|r| r["points"].as_f64().unwrap()).sum();
    assert!((listed - earned).abs() < 1e-6, "{statement}");
    assert!(
        (statement["request_points"].as_f64().unwrap()
            - statement["line"]["points"].as_f64().unwrap())
        .abs()
            < 1e-6,
        "{statement}"
    );
    assert_eq!(statement["from_ms"], 0);
    for request in requests {
        assert_eq!(request["rig"].as_str().map(|r| !r.is_empty()), Some(true));
        assert_eq!(request["receipt_check"], "verified", "{request}");
        assert!(request["receipt"].is_string(), "{request}");
    }

    // The next run's statement: only what was earned after the first.
    earn(&base, &key, 2, earned).await;
    let (_, _, second) = run(&base, json!({"rate_per_point": 0.5}), None).await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    let (operator_id, operator_token) = {
        let (status, body) =
            admin_post(&base, "/admin/operators", json!({"name": "op-test"})).await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    };
    assert!(!operator_id.is_empty());
    let (status, own) = get_as(
        &base,
        &operator_token,
        &format!("/operator/v1/payouts/{second_id}/statement"),
    )
    .await;
    assert_eq!(status, 200, "{own}");
    let ids = |s: &Value| -> Vec<String> {
        s["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (second_ids, first_ids) = (ids(&own), ids(&statement));
    assert_eq!(second_ids.len(), 2, "{own}");
    assert!(second_ids.iter().all(|id| !first_ids.contains(id)));
    assert_eq!(own["from_ms"], first["counted_until_ms"], "{own}");

    // Another rig owner: no line and no requests in it; unknown runs and no token are refused.
    let (status, body) = admin_post(&base, "/admin/operators", json!({"name": "mallory"})).await;
    assert_eq!(status, 201, "{body}");
    let mallory = body["token"].as_str().unwrap().to_owned();
    let (status, theirs) = get_as(
        &base,
        &mallory,
        &format!("/operator/v1/payouts/{first_id}/statement"),
    )
    .await;
    assert_eq!(status, 200, "{theirs}");
    assert!(
        theirs["line"].is_null() && theirs["requests"] == json!([]),
        "{theirs}"
    );
    let (status, body) = get_as(&base, &mallory, "/operator/v1/payouts/nope/statement").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("not_found")),
        "{body}"
    );
    let (status, _) = get_as(
        &base,
        "not-a-token",
        &format!("/operator/v1/payouts/{first_id}/statement"),
    )
    .await;
    assert_eq!(status, 401);
}
