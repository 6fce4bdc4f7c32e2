//! Purge hooks: after a write the catalog tells HTTP caches in front of it
//! (the gateway's cache, a CDN) to drop responses carrying the written
//! tags. `HttpPurger` POSTs `{"tags": [...]}` to each configured URL (such
//! as the gateway's `/_gateway/admin/purge`); `NoopPurger` does nothing.

use async_trait::async_trait;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("purge request to {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("purge request to {url} was answered {status}")]
    Status { url: String, status: u16 },
}

#[async_trait]
pub trait Purger: Send + Sync + std::fmt::Debug {
    /// Asks the caches to drop every response tagged with any of `tags`.
    /// Tries every target; returns the first failure.
    async fn purge(&self, tags: &[String]) -> Result<(), PurgeError>;
}

/// Does nothing: for deployments without an HTTP cache in front.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopPurger;

#[async_trait]
impl Purger for NoopPurger {
    async fn purge(&self, _tags: &[String]) -> Result<(), PurgeError> {
        Ok(())
    }
}

/// POSTs `{"tags": [...]}` to every URL, with an optional bearer token.
#[derive(Debug, Clone)]
pub struct HttpPurger {
    client: reqwest::Client,
    urls: Vec<String>,
    token: Option<String>,
}

impl HttpPurger {
    pub fn new(urls: Vec<String>, token: Option<String>, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .expect("HTTP client with defaults");
        HttpPurger {
            client,
            urls,
            token,
        }
    }
}

#[async_trait]
impl Purger for HttpPurger {
    async fn purge(&self, tags: &[String]) -> Result<(), PurgeError> {
        let body = serde_json::json!({ "tags": tags });
        let mut first_error = None;
        for url in &self.urls {
            let mut req = self.client.post(url).json(&body);
            if let Some(token) = &self.token {
                req = req.bearer_auth(token);
            }
            let outcome = match req.send().await {
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(PurgeError::Status {
                    url: url.clone(),
                    status: resp.status().as_u16(),
                }),
                Err(source) => Err(PurgeError::Request {
                    url: url.clone(),
                    source,
                }),
            };
            if let Err(e) = outcome {
                metrics::counter!("shoal_catalog_purge_errors_total").increment(1);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
