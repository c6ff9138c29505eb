//! The console over real HTTP, without a browser (tests/python/test_console.py drives one):
//! sessions shared by replicas on Redis, what a forged or cross-site form gets, a revoked key's
//! sessions, and names that must stay text.

use std::time::Duration;

use crate::support::*;
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::json;

/// A client that keeps the redirects to itself, and no cookie store: the session cookie is
/// handed over by hand, as a browser would send it.
pub(crate) fn browser() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Logs in with `token`; the session cookie (`name=value`).
pub(crate) async fn login(base: &str, token: &str) -> String {
    let response = browser()
        .post(format!("{base}/console/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    cookie.split(';').next().unwrap().to_owned()
}

pub(crate) async fn page(base: &str, path: &str, cookie: &str) -> (StatusCode, String) {
    let response = browser()
        .get(format!("{base}{path}"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

/// The CSRF token of a page (its `csrf-token` meta).
pub(crate) fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf-token\" content=\"")
        .expect("csrf meta")
        + 27;
    html[at..at + 64].to_owned()
}

#[tokio::test]
async fn a_session_made_on_one_replica_works_on_another_on_redis() {
    let redis = RedisServer::start();
    let replica = || {
        let mut cfg = config(vec![]);
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("console-secret".into());
        cfg
    };
    let (one, two) = (gateway(replica()).await, gateway(replica()).await);
    let cookie = login(&one.url(), ADMIN).await;
    let (status, html) = page(&two.url(), "/console/keys", &cookie).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    // A key made on the second replica's page, with the session from the first.
    let csrf = csrf_of(&html);
    let made = browser()
        .post(format!("{}/console/keys", two.url()))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("name", "across-replicas"),
            ("metadata", "{}"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::OK);
    let shown = made.text().await.unwrap();
    assert!(shown.contains("sk-garage-"), "{shown}");
    let keys = admin_get(&one.url(), "/admin/keys").await;
    assert!(
        keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "across-replicas")
    );
    // Logging out on the first ends it on both.
    let out = browser()
        .post(format!("{}/console/logout", one.url()))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let (status, _) = page(&two.url(), "/console/keys", &cookie).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn forged_and_cross_site_forms_change_nothing() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let cookie = login(&base, ADMIN).await;
    let (_, html) = page(&base, "/console/keys", &cookie).await;
    let csrf = csrf_of(&html);
    let post = |form: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut request = browser()
            .post(format!("{base}/console/keys"))
            .header("cookie", &cookie)
            .form(&form);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let name = || ("name", "forged".to_owned());
    let without = post(vec![name()], None).await.unwrap();
    assert_eq!(without.status(), StatusCode::FORBIDDEN);
    let wrong = post(vec![name(), ("csrf", "0".repeat(64))], None)
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let elsewhere = post(
        vec![name(), ("csrf", csrf.clone())],
        Some("https://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(elsewhere.status(), StatusCode::FORBIDDEN);
    let keys = admin_get(&base, "/admin/keys").await;
    assert!(
        keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["name"] != "forged"),
        "{keys}"
    );
    // Bad input gets a page saying what is wrong, and creates nothing.
    let bad = post(
        vec![
            name(),
            ("csrf", csrf.clone()),
            ("metadata", "[1, 2]".into()),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(bad.text().await.unwrap().contains("JSON object"));
    // Without a session: the login page, never the page.
    let (status, _) = page(&base, "/console/keys", "garage_console=00").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    // A wrong token sets no cookie.
    let refused = browser()
        .post(format!("{base}/console/login"))
        .form(&[("token", "sk-garage-nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn revoking_a_key_ends_its_console_sessions_and_roles_stay_apart() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let (id, key) = create_key(&base, json!({"name": "app"})).await;
    let cookie = login(&base, &key).await;
    let (status, html) = page(&base, "/console/app", &cookie).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    // An app developer's session does not open the operator's pages or their numbers.
    for path in [
        "/console/keys",
        "/console/rigs",
        "/console/live",
        "/console/usage.csv",
    ] {
        assert_eq!(
            page(&base, path, &cookie).await.0,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    let revoked = client()
        .delete(format!("{base}/admin/keys/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    wait_until(Duration::from_secs(5), "the session to end", || async {
        page(&base, "/console/app", &cookie).await.0 == StatusCode::SEE_OTHER
    })
    .await;
}

#[tokio::test]
async fn names_people_and_rigs_choose_stay_text() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let hostile = "<script>alert(1)</script>";
    create_key(
        &base,
        json!({"name": hostile, "metadata": {"note": "\"><img src=x>"}}),
    )
    .await;
    let token = enrollment_token(&base, 1).await;
    let enrolled = client()
        .post(format!("{base}/node/v1/enroll"))
        .json(&json!({"token": token, "name": "<img src=x onerror=alert(1)>"}))
        .send()
        .await
        .unwrap();
    assert_eq!(enrolled.status(), StatusCode::OK);
    let cookie = login(&base, ADMIN).await;
    for path in ["/console/keys", "/console/rigs"] {
        let (status, html) = page(&base, path, &cookie).await;
        assert_eq!(status, StatusCode::OK);
        for raw in ["<script>alert(1)", "<img src=x"] {
            assert!(!html.contains(raw), "{path} writes {raw} as markup");
        }
    }
    let (_, keys) = page(&base, "/console/keys", &cookie).await;
    assert!(keys.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    // Every console answer carries the policy that would stop an injected script anyway.
    let response = browser()
        .get(format!("{base}/console/rigs"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(response.headers()["x-frame-options"], "DENY");
}

#[tokio::test]
async fn a_rig_owner_sees_their_own_rigs_in_the_console_and_no_one_elses() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let mut tokens = Vec::new();
    for name in ["carol", "dave"] {
        let (status, body) =
            crate::support::admin_post(&base, "/admin/operators", json!({"name": name})).await;
        assert_eq!(status, 201, "{body}");
        tokens.push(body["token"].as_str().unwrap().to_owned());
    }
    let mut rigs = Vec::new();
    for (operator, rig) in [("carol", "carols-rig"), ("dave", "daves-rig")] {
        let (_, token) = crate::support::admin_post(
            &base,
            "/admin/enrollment-tokens",
            json!({"operator": operator}),
        )
        .await;
        let enrolled: serde_json::Value = client()
            .post(format!("{base}/node/v1/enroll"))
            .json(&json!({"token": token["token"], "name": rig}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        rigs.push(enrolled["node_id"].as_str().unwrap().to_owned());
    }
    let cookie = login(&base, &tokens[0]).await;
    let (status, html) = page(&base, "/console/operator", &cookie).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(
        html.contains("carols-rig") && !html.contains("daves-rig"),
        "{html}"
    );
    let (status, _) = page(
        &base,
        &format!("/console/operator/rigs/{}/statement", rigs[0]),
        &cookie,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = page(
        &base,
        &format!("/console/operator/rigs/{}/statement", rigs[1]),
        &cookie,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Not the gateway operator's pages.
    assert_eq!(
        page(&base, "/console/rigs", &cookie).await.0,
        StatusCode::FORBIDDEN
    );
    // An enrollment token of their own, with the command to run.
    let csrf = csrf_of(&html);
    let made = browser()
        .post(format!("{base}/console/operator/enroll"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::OK);
    assert!(
        made.text()
            .await
            .unwrap()
            .contains("node-runner run --gateway-url")
    );
}

/// The operator creates a rig owner in the console: the token shown once logs them in; revoking
/// it in the console ends their session.
#[tokio::test]
async fn an_operator_made_in_the_console_logs_in_until_revoked() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let admin = login(&base, ADMIN).await;
    let (_, html) = page(&base, "/console/operators", &admin).await;
    let csrf = csrf_of(&html);
    let made = browser()
        .post(format!("{base}/console/operators"))
        .header("cookie", &admin)
        .form(&[("csrf", csrf.as_str()), ("name", "erin")])
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::OK);
    let html = made.text().await.unwrap();
    let at = html.find("<code data-secret>").expect("the token") + "<code data-secret>".len();
    let token = &html[at..at + html[at..].find('<').unwrap()];
    assert!(token.starts_with("opr_"), "{token}");
    // The same name again is refused.
    let again = browser()
        .post(format!("{base}/console/operators"))
        .header("cookie", &admin)
        .form(&[("csrf", csrf.as_str()), ("name", "erin")])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);

    let owner = login(&base, token).await;
    assert_eq!(
        page(&base, "/console/operator", &owner).await.0,
        StatusCode::OK
    );
    let listed = crate::support::admin_get(&base, "/admin/operators").await;
    let id = listed["data"][0]["id"].as_str().unwrap().to_owned();
    let revoked = browser()
        .post(format!("{base}/console/operators/{id}/revoke"))
        .header("cookie", &admin)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        page(&base, "/console/operator", &owner).await.0,
        StatusCode::SEE_OTHER
    );
}

/// The operator adds a webhook endpoint in the console (its secret shown once, a hostile
/// description as text), sees its deliveries, and deletes it only when confirmed.
#[tokio::test]
async fn webhook_endpoints_are_managed_in_the_console() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let admin = login(&base, ADMIN).await;
    let (status, html) = page(&base, "/console/webhooks", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No webhook endpoint yet."), "{html}");
    let csrf = csrf_of(&html);
    let create = |fields: Vec<(&'static str, String)>| {
        let (base, admin) = (base.clone(), admin.clone());
        async move {
            let response = browser()
                .post(format!("{base}/console/webhooks"))
                .header("cookie", &admin)
                .form(&fields)
                .send()
                .await
                .unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    // Refused: no CSRF token, a URL that is not http(s), no event.
    let hook = "http://127.0.0.1:9/hook".to_owned();
    let (status, _) = create(vec![
        ("url", hook.clone()),
        ("events", "usage.recorded".into()),
    ])
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = create(vec![
        ("csrf", csrf.clone()),
        ("url", "javascript:alert(1)".into()),
        ("events", "usage.recorded".into()),
    ])
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = create(vec![("csrf", csrf.clone()), ("url", hook.clone())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(admin_get(&base, "/admin/webhooks").await["data"], json!([]));

    let (status, html) = create(vec![
        ("csrf", csrf.clone()),
        ("url", hook.clone()),
        ("events", "usage.recorded".into()),
        ("events", "budget.threshold".into()),
        ("description", "<img src=x onerror=alert(1)>".into()),
    ])
    .await;
    assert_eq!(status, StatusCode::OK);
    let at = html.find("<code data-secret>").expect("the secret") + "<code data-secret>".len();
    let secret = &html[at..at + html[at..].find('<').unwrap()];
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(!html.contains("<img"), "{html}");
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
    let listed = admin_get(&base, "/admin/webhooks").await;
    assert_eq!(
        listed["data"][0]["events"],
        json!(["usage.recorded", "budget.threshold"])
    );
    let id = listed["data"][0]["id"].as_str().unwrap().to_owned();
    let (_, html) = page(&base, "/console/webhooks", &admin).await;
    assert!(!html.contains(secret), "the secret is shown once");

    // A delivery to a port nobody listens on: pending, with its error.
    gw.state()
        .webhooks()
        .emit_now(&[garage_gateway::webhooks::Event {
            id: "budget:key:k1:day:0:50".into(),
            kind: garage_gateway::webhooks::EventKind::BudgetThreshold,
            subject: "k1".into(),
            data: json!({}),
            time_ms: 0,
        }])
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the first attempt", || async {
        page(&base, &format!("/console/webhooks/{id}"), &admin)
            .await
            .1
            .contains("refused")
    })
    .await;
    let (status, html) = page(&base, &format!("/console/webhooks/{id}"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("budget:key:k1:day:0:50"), "{html}");
    assert!(html.contains("pending"), "{html}");
    let (status, _) = page(&base, "/console/webhooks/we_nope", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let delete = |fields: Vec<(&'static str, String)>| {
        let (base, admin, id) = (base.clone(), admin.clone(), id.clone());
        async move {
            browser()
                .post(format!("{base}/console/webhooks/{id}/delete"))
                .header("cookie", &admin)
                .form(&fields)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        delete(vec![("csrf", csrf.clone())]).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        delete(vec![("confirm", "yes".into())]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        admin_get(&base, "/admin/webhooks").await["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        delete(vec![("csrf", csrf.clone()), ("confirm", "yes".into())]).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(admin_get(&base, "/admin/webhooks").await["data"], json!([]));
}
