//! The OpenAPI spec describes every served route, and every described route is served.

use std::collections::BTreeSet;

use crate::support::*;

/// Routes that are not API operations: Swagger UI's page and assets, and the two catch-alls axum
/// registers for the fallback (which answers the OpenAI-shaped 404).
const NOT_OPERATIONS: &[&str] = &[
    "/docs",
    "/docs/",
    "/docs/{*rest}",
    "/",
    "/{*__private__axum_fallback}",
    // The console's stylesheet and script: static files, as Swagger UI's under /docs.
    "/console/assets/console.css",
    "/console/assets/console.js",
];

#[tokio::test]
async fn every_served_route_is_in_the_spec() {
    let gw = gateway(config(vec![])).await;
    let app = garage_gateway::http::router(gw.state().clone());
    // axum keeps no public list of its routes, but its Debug output names every path; parse the
    // quoted strings that look like paths.
    let debug = format!("{app:?}");
    let served: BTreeSet<String> = debug
        .split('"')
        .filter(|s| s.starts_with('/'))
        // A wildcard operation (`/v1/models/{*model}`: model names with a slash) is described
        // with OpenAPI's one-segment template.
        .map(|path| match NOT_OPERATIONS.contains(&path) {
            true => path.to_owned(),
            false => path.replace("{*", "{"),
        })
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

    // The inference routes, answered ahead of the router (`api::InferenceFirst`), are the
    // router's routes too, described as POST.
    for path in garage_gateway::inference::api::inference_paths() {
        assert!(served.contains(&path), "{path} is answered but not routed");
        assert!(
            spec["paths"][&path]["post"].is_object(),
            "{path} is answered but not described as POST"
        );
    }

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

/// The spec, the docs page and the metrics are compressed for a client that accepts gzip, and
/// come back the same once inflated; the inference routes are never touched.
#[tokio::test]
async fn docs_and_metrics_are_gzipped_when_asked_and_answers_are_not() {
    use std::io::Read as _;
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, serde_json::json!({"name": "t"})).await;
    // One answer, so that the metrics have series in them.
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    for path in ["/openapi.json", "/metrics", "/docs/swagger-ui-bundle.js"] {
        let plain = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(plain.status(), 200, "{path}");
        assert!(plain.headers().get("content-encoding").is_none(), "{path}");
        let plain = plain.bytes().await.unwrap();
        let gzipped = client()
            .get(format!("{base}{path}"))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(gzipped.headers()["content-encoding"], "gzip", "{path}");
        let gzipped = gzipped.bytes().await.unwrap();
        assert!(
            gzipped.len() * 2 < plain.len(),
            "{path}: {} of {}",
            gzipped.len(),
            plain.len()
        );
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&gzipped[..])
            .read_to_end(&mut inflated)
            .unwrap();
        if path == "/metrics" {
            // Counters move between two scrapes; the series are the same.
            let names = |text: &[u8]| -> Vec<String> {
                String::from_utf8_lossy(text)
                    .lines()
                    .filter(|l| l.starts_with("# TYPE"))
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(names(&inflated), names(&plain));
        } else {
            assert_eq!(inflated, plain, "{path}");
        }
    }
    let answer = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.headers().get("content-encoding").is_none());
}
