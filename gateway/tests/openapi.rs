//! The OpenAPI spec describes every served route, and every described route is served.

mod support;

use std::collections::BTreeSet;

use support::*;

/// Routes that are not API operations: Swagger UI's page and assets, and the two catch-alls axum
/// registers for the fallback (which answers the OpenAI-shaped 404).
const NOT_OPERATIONS: &[&str] = &[
    "/docs",
    "/docs/",
    "/docs/{*rest}",
    "/",
    "/{*__private__axum_fallback}",
];

#[tokio::test]
async fn every_served_route_is_in_the_spec() {
    let gw = gateway(config(vec![])).await;
    let app = garage_gateway::api::router(gw.state().clone());
    // axum keeps no public list of its routes, but its Debug output names every path; parse the
    // quoted strings that look like paths.
    let debug = format!("{app:?}");
    let served: BTreeSet<String> = debug
        .split('"')
        .filter(|s| s.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert!(
        served.contains("/v1/chat/completions"),
        "route listing changed shape: {debug}"
    );

    let spec: serde_json::Value = client()
        .get(format!("{}/openapi.json", gw.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let described: BTreeSet<String> = spec["paths"].as_object().unwrap().keys().cloned().collect();

    let undocumented: Vec<_> = served
        .iter()
        .filter(|p| !described.contains(*p) && !NOT_OPERATIONS.contains(&p.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "served but not in the spec: {undocumented:?}"
    );

    // And the other way: each described operation answers with something other than the
    // router's own 404/405.
    for (path, operations) in spec["paths"].as_object().unwrap() {
        let concrete = path.replace("{model}", MODEL).replace("{id}", "key_x");
        for method in operations.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = client()
                .request(method.clone(), format!("{}{concrete}", gw.url()))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert!(
                status != 405 && !body.contains("Unknown route"),
                "{method} {path} is described but not served ({status})"
            );
        }
    }
}

#[tokio::test]
async fn docs_page_works_offline() {
    let gw = gateway(config(vec![])).await;
    let page = client()
        .get(format!("{}/docs/", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    // The UI's assets are served by the gateway itself, not a CDN.
    assert!(
        !html.contains("https://"),
        "docs page pulls from the internet: {html}"
    );
    let js = client()
        .get(format!("{}/docs/swagger-ui-bundle.js", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
}
