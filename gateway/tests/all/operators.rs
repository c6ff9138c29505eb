//! Rig owners: an admin creates an operator and gives them a token; with it they make their own
//! enrollment tokens and see only their own rigs, earnings and statements. Each credential
//! opens only its own door.

use crate::support::*;
use serde_json::{Value, json};

async fn create_operator(base: &str, name: &str) -> (String, String) {
    let (status, body) = admin_post(base, "/admin/operators", json!({"name": name})).await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

async fn as_operator(base: &str, token: &str, method: reqwest::Method, path: &str) -> (u16, Value) {
    let response = client()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn enroll(base: &str, token: &str, name: &str) -> String {
    let response = client()
        .post(format!("{base}/node/v1/enroll"))
        .json(&json!({"token": token, "name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["node_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_operator_sees_only_their_own_rigs_and_makes_their_own_tokens() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let (alice_id, alice) = create_operator(&base, "alice").await;
    let (_, bob) = create_operator(&base, "bob").await;
    // One name, one operator.
    let (status, body) = admin_post(&base, "/admin/operators", json!({"name": "alice"})).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = admin_post(&base, "/admin/operators", json!({"name": " "})).await;
    assert_eq!(status, 400, "{body}");

    // Alice makes a token; the rig it enrolls earns under her name, whatever she asks.
    let (status, token) = as_operator(
        &base,
        &alice,
        reqwest::Method::POST,
        "/operator/v1/enrollment-tokens",
    )
    .await;
    assert_eq!(status, 201, "{token}");
    assert_eq!(token["operator"], "alice");
    let alices_rig = enroll(&base, token["token"].as_str().unwrap(), "alices-rig").await;
    let (_, token) = as_operator(
        &base,
        &bob,
        reqwest::Method::POST,
        "/operator/v1/enrollment-tokens",
    )
    .await;
    let bobs_rig = enroll(&base, token["token"].as_str().unwrap(), "bobs-rig").await;

    let (status, nodes) =
        as_operator(&base, &alice, reqwest::Method::GET, "/operator/v1/nodes").await;
    assert_eq!(status, 200, "{nodes}");
    let ids: Vec<&str> = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [alices_rig.as_str()]);
    // Bob's rig's statement is not hers to read (404, as for a rig that does not exist).
    let (status, _) = as_operator(
        &base,
        &alice,
        reqwest::Method::GET,
        &format!("/operator/v1/nodes/{bobs_rig}/statement"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, statement) = as_operator(
        &base,
        &alice,
        reqwest::Method::GET,
        &format!("/operator/v1/nodes/{alices_rig}/statement"),
    )
    .await;
    assert_eq!(status, 200, "{statement}");
    let (status, earnings) = as_operator(
        &base,
        &alice,
        reqwest::Method::GET,
        "/operator/v1/earnings?days=7",
    )
    .await;
    assert_eq!(status, 200, "{earnings}");
    assert_eq!(earnings["operator"], "alice");
    assert_eq!(earnings["days"].as_array().unwrap().len(), 7);

    // Each credential opens only its own door.
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    for (who, token) in [("api key", key.as_str()), ("admin token", ADMIN)] {
        let (status, _) =
            as_operator(&base, token, reqwest::Method::GET, "/operator/v1/nodes").await;
        assert_eq!(status, 401, "{who}");
    }
    let (status, _) = as_operator(&base, &alice, reqwest::Method::GET, "/admin/nodes").await;
    assert_eq!(status, 401, "an operator token on the admin API");
    let forged = format!("{alice_id}.{}", "x".repeat(40));
    let (status, _) = as_operator(&base, &forged, reqwest::Method::GET, "/operator/v1/nodes").await;
    assert_eq!(status, 401, "a forged secret");

    // Revoked: refused at once; the listing shows it.
    let revoked = client()
        .delete(format!("{base}/admin/operators/{alice_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let (status, body) =
        as_operator(&base, &alice, reqwest::Method::GET, "/operator/v1/nodes").await;
    assert_eq!(status, 403, "{body}");
    let listed = admin_get(&base, "/admin/operators").await;
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["name"] == "alice" && !o["revoked_at"].is_null()),
        "{listed}"
    );
    assert!(
        listed.to_string().find("token").is_none(),
        "no secret listed: {listed}"
    );
}

/// A rig's name is shown on pages and in logs: a long or unprintable one is refused, and the
/// token it came with is not spent on it.
#[tokio::test]
async fn a_rig_name_too_long_or_unprintable_is_refused_without_spending_the_token() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let token = enrollment_token(&base, 1).await;
    for name in [
        "x".repeat(129),
        "bell\u{7}".to_owned(),
        "line\nbreak".to_owned(),
    ] {
        let response = client()
            .post(format!("{base}/node/v1/enroll"))
            .json(&json!({"token": token, "name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], "name", "{body}");
    }
    // The single-use token is still good.
    enroll(&base, &token, &"é".repeat(128)).await;
}
