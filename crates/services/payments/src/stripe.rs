//! The Stripe adapter: `POST /v1/payment_intents` (form-encoded, confirm
//! at once, `Idempotency-Key` header) and `GET /v1/payment_intents/{id}`,
//! mapping Stripe's answers onto `ChargeOutcome` and `ProviderError`.

use crate::{ChargeOutcome, ChargeRecord, ChargeRequest, PaymentProvider, ProviderError};
use async_trait::async_trait;
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct StripeProvider {
    base_url: String,
    api_key: String,
    http: reqwest::Client,
}

impl StripeProvider {
    /// `base_url` is `https://api.stripe.com` or the sandbox's address.
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Self {
        StripeProvider {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(2)))
                .build()
                .expect("http client"),
        }
    }
}

fn outcome_from_intent(intent: &Value) -> Result<ChargeOutcome, ProviderError> {
    let id = intent["id"].as_str().unwrap_or_default().to_string();
    match intent["status"].as_str() {
        Some("succeeded") => Ok(ChargeOutcome::Succeeded { provider_id: id }),
        Some("processing") | Some("requires_capture") => {
            Ok(ChargeOutcome::Processing { provider_id: id })
        }
        Some("requires_payment_method") | Some("canceled") => Ok(ChargeOutcome::Declined {
            provider_id: Some(id),
            code: intent["last_payment_error"]["code"]
                .as_str()
                .unwrap_or("declined")
                .to_string(),
            message: intent["last_payment_error"]["message"]
                .as_str()
                .unwrap_or("the payment was declined")
                .to_string(),
        }),
        other => Err(ProviderError::Retryable(format!(
            "payment intent {id} is in an unexpected state {other:?}"
        ))),
    }
}

async fn classify(response: reqwest::Response) -> Result<ChargeOutcome, ProviderError> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| ProviderError::Retryable(format!("unreadable response ({status}): {e}")))?;
    if status.is_success() {
        return outcome_from_intent(&body);
    }
    let error = &body["error"];
    let message = error["message"]
        .as_str()
        .unwrap_or("no message")
        .to_string();
    match status.as_u16() {
        402 => {
            let intent = &error["payment_intent"];
            Ok(ChargeOutcome::Declined {
                provider_id: intent["id"].as_str().map(str::to_string),
                code: error["code"]
                    .as_str()
                    .unwrap_or("card_declined")
                    .to_string(),
                message,
            })
        }
        409 | 429 => Err(ProviderError::Retryable(format!("{status}: {message}"))),
        s if s >= 500 => Err(ProviderError::Retryable(format!("{status}: {message}"))),
        _ => Err(ProviderError::Permanent(format!("{status}: {message}"))),
    }
}

fn transport(e: reqwest::Error) -> ProviderError {
    ProviderError::Retryable(format!("no answer from the provider: {e}"))
}

#[async_trait]
impl PaymentProvider for StripeProvider {
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        let mut form: Vec<(String, String)> = vec![
            ("amount".into(), request.amount.to_string()),
            ("currency".into(), request.currency.clone()),
            ("payment_method".into(), request.payment_method.clone()),
            ("confirm".into(), "true".into()),
        ];
        for (k, v) in &request.metadata {
            form.push((format!("metadata[{k}]"), v.clone()));
        }
        let url = format!("{}/v1/payment_intents", self.base_url);
        let request = self
            .http
            .post(&url)
            .bearer_auth(&self.api_key)
            .header("idempotency-key", &request.idempotency_key)
            .form(&form);
        let (request, span) = shoal_runtime::client::trace_request(
            request,
            "payment provider: create intent",
            &reqwest::Method::POST,
            &url,
        );
        let sent = request.send().await;
        shoal_runtime::client::end_request_span(span, sent.as_ref().map(|r| r.status().as_u16()));
        classify(sent.map_err(transport)?).await
    }

    async fn retrieve(&self, provider_id: &str) -> Result<ChargeRecord, ProviderError> {
        // The id may come from a webhook's body: one path segment, no more.
        if provider_id.is_empty()
            || !provider_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ProviderError::Permanent(format!(
                "`{provider_id}` is not a payment intent id"
            )));
        }
        let url = format!("{}/v1/payment_intents/{provider_id}", self.base_url);
        let (request, span) = shoal_runtime::client::trace_request(
            self.http.get(&url).bearer_auth(&self.api_key),
            "payment provider: retrieve intent",
            &reqwest::Method::GET,
            &url,
        );
        let sent = request.send().await;
        shoal_runtime::client::end_request_span(span, sent.as_ref().map(|r| r.status().as_u16()));
        let response = sent.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return match classify(response).await {
                Err(e) => Err(e),
                Ok(other) => Err(ProviderError::Retryable(format!(
                    "unexpected answer {status} to a retrieval: {other:?}"
                ))),
            };
        }
        let intent: Value = response.json().await.map_err(|e| {
            ProviderError::Retryable(format!("unreadable response ({status}): {e}"))
        })?;
        Ok(ChargeRecord {
            outcome: outcome_from_intent(&intent)?,
            amount: intent["amount"].as_i64().unwrap_or(-1),
            currency: intent["currency"].as_str().unwrap_or_default().to_string(),
            payment_id: intent["metadata"]["payment_id"]
                .as_str()
                .map(str::to_string),
        })
    }
}
