//! Extractors with clear errors: `ApiJson<T>` (JSON bodies: 415 for a wrong
//! content type, 400 for malformed JSON, 422 naming the missing or invalid
//! field, 413 past the body limit) and `ClientAddr` (the client's address,
//! from the gateway's X-Forwarded-For when the peer is a trusted proxy).

use crate::error::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use shoal_core::Problem;
use std::net::{IpAddr, SocketAddr};

/// A JSON body; rejections become problem+json.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(ApiError(json_rejection_problem(&rejection))),
        }
    }
}

fn json_rejection_problem(rejection: &JsonRejection) -> Problem {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => Problem::unsupported_media_type(
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(e) => Problem::bad_request(format!(
            "the body is not valid JSON: {}",
            inner_message(&e.body_text())
        )),
        JsonRejection::JsonDataError(e) => {
            let message = inner_message(&e.body_text());
            let mut p = Problem::validation(format!(
                "the JSON body does not have the expected shape: {message}"
            ));
            if let Some(field) = backticked_after(&message, "missing field `") {
                p = p.with_field(field, "is required");
            } else if let Some((field, _)) = message.split_once(": ") {
                if !field.contains(' ') && !field.is_empty() {
                    p = p.with_field(field, message.clone());
                }
            }
            p
        }
        other if other.status().as_u16() == 413 => {
            Problem::payload_too_large("the request body is larger than this endpoint accepts")
        }
        other => Problem::new(
            other.status().as_u16(),
            "bad-body",
            "Bad request body",
            other.body_text(),
        ),
    }
}

/// axum's texts start with a fixed preamble; keep the part after it.
fn inner_message(text: &str) -> String {
    text.split_once(": ")
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_else(|| text.to_string())
}

fn backticked_after(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)? + prefix.len();
    let rest = &text[start..];
    rest.find('`').map(|end| rest[..end].to_string())
}

/// The client's address: the last X-Forwarded-For entry when the peer is
/// a loopback or private address (a gateway in front of us), else the peer.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let trusted = match peer {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
            IpAddr::V6(v6) => v6.is_loopback(),
        };
        if trusted {
            if let Some(ip) = parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|s| s.trim().parse::<IpAddr>().ok())
                .next_back()
            {
                return Ok(ClientAddr(ip));
            }
        }
        Ok(ClientAddr(peer))
    }
}
