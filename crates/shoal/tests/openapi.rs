//! The API contract: `GET /api/openapi.json` through `shoal up` is an
//! OpenAPI 3.1 document of every service, every operation it names is
//! served, and nothing else is served on its paths: every other method
//! answers 405. (New paths cannot appear undescribed: a service gives its
//! routes as `shoal_runtime::openapi::Api`, whose only ways to add a route
//! take the route's description. What the type cannot stop, a hand-built
//! route serving more methods than it describes, the 405 probe catches.)

mod common;

use common::Stack;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_service_and_each_operation_is_served() {
    let stack = Stack::start(1, &[]);
    stack.wait_ready(1).await;
    let http = reqwest::Client::new();
    let r = http
        .get(stack.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let tags: Vec<&str> = doc["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for service in [
        "accounts",
        "catalog",
        "media",
        "notifications",
        "orders",
        "payments",
        "runtime",
    ] {
        assert!(
            tags.contains(&service),
            "{service} is in the document: {tags:?}"
        );
    }
    let mut operations = 0;
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let url = stack.url(&path.replace("{id}", "x").replace("{key}", "x"));
        // A method the document does not give for this path is not served.
        for m in ["get", "post", "put", "patch", "delete"] {
            if item.get(m).is_some() {
                continue;
            }
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let answer = http.request(method, &url).send().await.unwrap();
            let status = answer.status().as_u16();
            let body = answer.text().await.unwrap_or_default();
            assert_eq!(
                status, 405,
                "{m} {path} is not in the document, so it must not be served: {body}"
            );
        }
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            assert!(
                ids.insert(op["operationId"].as_str().unwrap().to_string()),
                "operation ids are unique: {}",
                op["operationId"]
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2') || s == "101"),
                "{method} {path} documents its success"
            );
            // Served: not the router's "no route" 404, not a 405.
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = http.request(m, &url).send().await.unwrap();
            let status = answer.status().as_u16();
            let body = answer.text().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path} is served: {body}");
            assert!(
                !(status == 404 && body.contains("no route matches")),
                "{method} {path} is served: {body}"
            );
            // An answer the document lists (or one any route may give).
            assert!(
                responses.contains_key(&status.to_string()),
                "{method} {path} answered {status}, which its description does not list: {body}"
            );
        }
    }
    assert!(operations >= 30, "{operations} operations");
}
