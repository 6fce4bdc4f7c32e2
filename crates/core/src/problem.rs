//! RFC 9457 problem details: the one error body every Shoal HTTP surface
//! returns (`application/problem+json`).

use serde::{Deserialize, Serialize};

/// The media type of a problem details body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Sent by a Shoal instance with a 503 it gave because it was overloaded,
/// not broken, so that a gateway may try the request on another instance:
/// [`Overload::Unprocessed`] when nothing of the request was done (any
/// request whose body the gateway kept may go elsewhere),
/// [`Overload::Busy`] when the handler gave up part way (only an
/// idempotent one may). A 503 without it is not retried.
pub const OVERLOAD_HEADER: &str = "x-shoal-overload";

/// Why an instance refused a request it could not serve now; the value of
/// [`OVERLOAD_HEADER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// Refused before any of the request's work began (the concurrency
    /// limit, the instance's stream limit).
    Unprocessed,
    /// The handler began and could not go on (no database connection came
    /// free in time): some of its work may have been done.
    Busy,
}

impl Overload {
    /// The header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Overload::Unprocessed => "unprocessed",
            Overload::Busy => "busy",
        }
    }

    /// The value read back from the header: anything else is not an
    /// overload.
    pub fn parse(value: &[u8]) -> Option<Self> {
        match value {
            b"unprocessed" => Some(Overload::Unprocessed),
            b"busy" => Some(Overload::Busy),
            _ => None,
        }
    }
}

/// A problem details object (RFC 9457). `errors` lists field-level problems
/// for validation failures so a client can point at the field to fix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub errors: Vec<FieldError>,
    /// Set when the client may retry, in seconds (also sent as Retry-After).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Set on a 503 for overload: sent as [`OVERLOAD_HEADER`], not in the
    /// body.
    #[serde(skip)]
    pub overload: Option<Overload>,
}

/// One invalid field: a JSON pointer-ish name and what is wrong with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl Problem {
    /// A problem with a status and a human-readable detail. The type is a
    /// stable, documented slug under `https://shoal.dev/problems/`.
    pub fn new(status: u16, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("https://shoal.dev/problems/{slug}"),
            title: title.to_string(),
            status,
            detail: Some(detail.into()),
            instance: None,
            errors: Vec::new(),
            retry_after: None,
            overload: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Marks a 503 as the instance's overload (see [`OVERLOAD_HEADER`]).
    pub fn overloaded(mut self, why: Overload) -> Self {
        self.overload = Some(why);
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(400, "bad-request", "Bad request", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", "Unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(403, "forbidden", "Forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(404, "not-found", "Not found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(409, "conflict", "Conflict", detail)
    }
    pub fn payload_too_large(detail: impl Into<String>) -> Self {
        Self::new(413, "payload-too-large", "Payload too large", detail)
    }
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
    }
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(422, "validation", "Validation failed", detail)
    }
    pub fn too_many_requests(detail: impl Into<String>, retry_after: u64) -> Self {
        Self::new(429, "rate-limited", "Too many requests", detail).with_retry_after(retry_after)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(500, "internal", "Internal server error", detail)
    }
    pub fn bad_gateway(detail: impl Into<String>) -> Self {
        Self::new(502, "bad-gateway", "Bad gateway", detail)
    }
    pub fn unavailable(detail: impl Into<String>, retry_after: u64) -> Self {
        Self::new(503, "unavailable", "Service unavailable", detail).with_retry_after(retry_after)
    }
    pub fn gateway_timeout(detail: impl Into<String>) -> Self {
        Self::new(504, "gateway-timeout", "Gateway timeout", detail)
    }

    /// The serialized body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"title\":\"error\"}".to_vec())
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.title)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}
