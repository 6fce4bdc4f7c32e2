//! The API contract. A service declares each operation where it routes it
//! ([`Api`]): the route and its OpenAPI description are one call, so a
//! route cannot exist without being described. Request and response
//! bodies are described by their Rust types (`schemars`, JSON Schema
//! 2020-12 as OpenAPI 3.1 uses it) or, for bodies built ad hoc, by a
//! schema written beside the handler. [`document`] merges every service's
//! operations into one OpenAPI 3.1 document, which `serve` answers at
//! `GET /api/openapi.json`.

use crate::context::AppContext;
use axum::handler::Handler;
use axum::routing::MethodRouter;
use axum::Router;
use serde_json::{json, Map, Value};

/// A service's routes with their descriptions.
pub struct Api {
    router: Router<AppContext>,
    operations: Vec<Operation>,
}

/// One operation: a method on a path, and what it takes and answers.
#[derive(Debug, Clone)]
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub value: Value,
    /// On the instance's own port only (probes aside): metrics, the
    /// console's stats, debug routes. Not in the public document.
    pub internal: bool,
}

impl Default for Api {
    fn default() -> Self {
        Api::new()
    }
}

impl Api {
    pub fn new() -> Api {
        Api {
            router: Router::new(),
            operations: Vec::new(),
        }
    }

    fn add(
        mut self,
        method: &'static str,
        path: &'static str,
        route: MethodRouter<AppContext>,
        op: Op,
    ) -> Api {
        self.router = self.router.route(path, route);
        self.routed_later(method, path, op)
    }

    pub fn get<H: Handler<T, AppContext>, T: 'static>(
        self,
        path: &'static str,
        handler: H,
        op: Op,
    ) -> Api {
        self.add("get", path, axum::routing::get(handler), op)
    }

    pub fn post<H: Handler<T, AppContext>, T: 'static>(
        self,
        path: &'static str,
        handler: H,
        op: Op,
    ) -> Api {
        self.add("post", path, axum::routing::post(handler), op)
    }

    pub fn put<H: Handler<T, AppContext>, T: 'static>(
        self,
        path: &'static str,
        handler: H,
        op: Op,
    ) -> Api {
        self.add("put", path, axum::routing::put(handler), op)
    }

    pub fn delete<H: Handler<T, AppContext>, T: 'static>(
        self,
        path: &'static str,
        handler: H,
        op: Op,
    ) -> Api {
        self.add("delete", path, axum::routing::delete(handler), op)
    }

    /// A route built by hand (with layers of its own), serving `method`.
    pub fn route(
        self,
        method: &'static str,
        path: &'static str,
        route: MethodRouter<AppContext>,
        op: Op,
    ) -> Api {
        self.add(method, path, route, op)
    }

    /// A layer (an `Extension`, a limit) around every route so far. (No
    /// way to add a route without its description: there is no access to
    /// the router itself.)
    pub fn layer<L>(mut self, layer: L) -> Api
    where
        L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: tower::Service<axum::extract::Request> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Response:
            axum::response::IntoResponse + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Error:
            Into<std::convert::Infallible> + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Future: Send + 'static,
    {
        self.router = self.router.layer(layer);
        self
    }

    /// Describes an operation whose route is added later (the document's
    /// own, which needs the document first).
    pub fn routed_later(mut self, method: &'static str, path: &'static str, op: Op) -> Api {
        let internal = op.internal;
        self.operations.push(Operation {
            method,
            path,
            value: op.into_value(path),
            internal,
        });
        self
    }

    /// Adds another `Api`'s routes and operations.
    pub fn merge(mut self, other: Api) -> Api {
        self.router = self.router.merge(other.router);
        self.operations.extend(other.operations);
        self
    }

    /// The router, and the operations it serves.
    pub fn into_parts(self) -> (Router<AppContext>, Vec<Operation>) {
        (self.router, self.operations)
    }
}

/// The schema of `T` as it is serialized (a response body).
pub fn response_schema<T: schemars::JsonSchema>() -> Value {
    schema::<T>(schemars::generate::Contract::Serialize)
}

/// The schema of `T` as it is deserialized (a request body).
pub fn request_schema<T: schemars::JsonSchema>() -> Value {
    schema::<T>(schemars::generate::Contract::Deserialize)
}

fn schema<T: schemars::JsonSchema>(contract: schemars::generate::Contract) -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
            s.contract = contract;
            s.meta_schema = None;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    if let Value::Object(map) = &mut value {
        map.remove("title");
    }
    value
}

/// One documented answer: status, description, body (content type and
/// schema) and headers.
type Answer = (
    u16,
    String,
    Option<(String, Value)>,
    Vec<(&'static str, &'static str)>,
);

/// What an operation takes and answers, built up by its methods.
#[derive(Debug, Clone)]
pub struct Op {
    summary: String,
    tag: &'static str,
    description: Option<String>,
    parameters: Vec<Value>,
    /// Request body content types and their schemas.
    bodies: Vec<(String, Value)>,
    responses: Vec<Answer>,
    session: bool,
    token: bool,
    internal: bool,
}

/// A problem+json answer (RFC 9457), as every error is.
pub fn problem_schema() -> Value {
    json!({
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "retry_after": {"type": "integer", "minimum": 0},
        },
    })
}

impl Op {
    /// An operation of the service tagged `tag`, summed up by `summary`.
    pub fn new(tag: &'static str, summary: impl Into<String>) -> Op {
        Op {
            summary: summary.into(),
            tag,
            description: None,
            parameters: Vec::new(),
            bodies: Vec::new(),
            responses: Vec::new(),
            session: false,
            token: false,
            internal: false,
        }
    }

    pub fn describe(mut self, text: impl Into<String>) -> Op {
        self.description = Some(text.into());
        self
    }

    /// Served on the instance's own port for operators (the gateway does
    /// not route it): described, but left out of the public document.
    pub fn internal(mut self) -> Op {
        self.internal = true;
        self
    }

    /// Needs a logged-in session (the `shoal_session` cookie); 401 without.
    pub fn session(mut self) -> Op {
        self.session = true;
        self.problems(&[401])
    }

    /// Needs a bearer token; 401 without, 403 while none is configured.
    pub fn token(mut self) -> Op {
        self.token = true;
        self.problems(&[401, 403])
    }

    /// A query parameter (`schema` a JSON Schema).
    pub fn query(mut self, name: &str, required: bool, schema: Value, description: &str) -> Op {
        self.parameters.push(json!({
            "name": name, "in": "query", "required": required,
            "schema": schema, "description": description,
        }));
        self
    }

    /// A header parameter.
    pub fn header(mut self, name: &str, required: bool, description: &str) -> Op {
        self.parameters.push(json!({
            "name": name, "in": "header", "required": required,
            "schema": {"type": "string"}, "description": description,
        }));
        self
    }

    /// A JSON request body of type `T` (as it is deserialized).
    pub fn json_body<T: schemars::JsonSchema>(self) -> Op {
        self.body("application/json", request_schema::<T>())
    }

    /// A request body of `content_type` with `schema` (call again for
    /// more content types); 415 and 422 for bodies that are not it, 413
    /// past the limit.
    pub fn body(mut self, content_type: &str, schema: Value) -> Op {
        self.bodies.push((content_type.to_string(), schema));
        self.problems(&[413, 415, 422])
    }

    /// A success (or other documented) answer with a JSON body `schema`.
    pub fn json(self, status: u16, description: &str, schema: Value) -> Op {
        self.answer(status, description, "application/json", schema)
    }

    /// A JSON answer of type `T` (as it is serialized).
    pub fn returns<T: schemars::JsonSchema>(self, status: u16, description: &str) -> Op {
        self.json(status, description, response_schema::<T>())
    }

    /// An answer of any content type.
    pub fn answer(
        mut self,
        status: u16,
        description: &str,
        content_type: &str,
        schema: Value,
    ) -> Op {
        self.responses.push((
            status,
            description.into(),
            Some((content_type.into(), schema)),
            Vec::new(),
        ));
        self
    }

    /// An answer without a body.
    pub fn empty(mut self, status: u16, description: &str) -> Op {
        self.responses
            .push((status, description.into(), None, Vec::new()));
        self
    }

    /// A header of the last answer added.
    pub fn with_header(mut self, name: &'static str, description: &'static str) -> Op {
        if let Some(last) = self.responses.last_mut() {
            last.3.push((name, description));
        }
        self
    }

    /// problem+json answers with these statuses.
    pub fn problems(mut self, statuses: &[u16]) -> Op {
        for &s in statuses {
            if !self.responses.iter().any(|r| r.0 == s) {
                self.responses.push((
                    s,
                    problem_title(s).into(),
                    Some(("application/problem+json".into(), problem_schema())),
                    Vec::new(),
                ));
            }
        }
        self
    }

    fn into_value(self, path: &str) -> Value {
        // Every answer the middleware may give on any route.
        let op = self.problems(&[400, 403, 429, 500, 503, 504]);
        let mut parameters = op.parameters.clone();
        for segment in path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let name = name.trim_start_matches('*');
                parameters.push(json!({
                    "name": name, "in": "path", "required": true, "schema": {"type": "string"},
                }));
            }
        }
        let mut responses = Map::new();
        for (status, description, body, headers) in &op.responses {
            let mut r = json!({ "description": description });
            if let Some((ct, schema)) = body {
                r["content"] = json!({ ct.as_str(): { "schema": schema } });
            }
            if !headers.is_empty() {
                r["headers"] = Value::Object(
                    headers
                        .iter()
                        .map(|(n, d)| {
                            (
                                n.to_string(),
                                json!({"description": d, "schema": {"type": "string"}}),
                            )
                        })
                        .collect(),
                );
            }
            responses.insert(status.to_string(), r);
        }
        let mut v = json!({
            "tags": [op.tag],
            "summary": op.summary,
            "operationId": format!("{}_{}", op.tag, op.summary.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "_")),
            "responses": responses,
        });
        if let Some(d) = &op.description {
            v["description"] = d.clone().into();
        }
        if !parameters.is_empty() {
            v["parameters"] = parameters.into();
        }
        if !op.bodies.is_empty() {
            let content: Map<String, Value> = op
                .bodies
                .iter()
                .map(|(ct, schema)| (ct.clone(), json!({ "schema": schema })))
                .collect();
            v["requestBody"] = json!({ "required": true, "content": content });
        }
        let mut security = Vec::new();
        if op.session {
            security.push(json!({"session": []}));
        }
        if op.token {
            security.push(json!({"bearer": []}));
        }
        if !security.is_empty() {
            v["security"] = security.into();
        }
        v
    }
}

fn problem_title(status: u16) -> &'static str {
    match status {
        400 => "Bad request",
        401 => "Not logged in, or a wrong token",
        403 => "Forbidden (a cross-site request, or not yours)",
        404 => "Not found",
        405 => "Method not allowed",
        409 => "Conflict",
        413 => "Body too large",
        415 => "Unsupported media type",
        422 => "Invalid input (see `errors`)",
        429 => "Too many requests",
        500 => "Internal error",
        502 => "A service this one needs failed",
        503 => "Overloaded or draining; retry",
        504 => "Deadline passed",
        _ => "Error",
    }
}

/// The OpenAPI 3.1 document of the public `operations`.
pub fn document(operations: &[Operation]) -> Value {
    let operations: Vec<&Operation> = operations.iter().filter(|o| !o.internal).collect();
    let mut paths = Map::new();
    for op in &operations {
        let entry = paths
            .entry(op.path.replace("{*", "{"))
            .or_insert_with(|| json!({}));
        entry[op.method] = op.value.clone();
    }
    let mut tags: Vec<&str> = operations
        .iter()
        .filter_map(|o| o.value["tags"][0].as_str())
        .collect();
    tags.sort_unstable();
    tags.dedup();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Shoal",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The services' HTTP API. Errors are application/problem+json (RFC 9457). \
                Sessions: POST /api/accounts/login sets the `shoal_session` cookie.",
        },
        "tags": tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "shoal_session"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    })
}
