//! Payments through a provider: the `PaymentProvider` trait, the Stripe
//! adapter that speaks Stripe's HTTP API (the bundled sandbox speaks the
//! same subset, so one adapter serves both), and verification of the
//! provider's signed webhooks.
//!
//! Every charge carries an idempotency key chosen by the caller (the
//! payment's id), so a charge retried after a timeout or a lost response
//! is one charge at the provider. Errors say whether a retry is safe.

mod service;
mod stripe;

pub use service::{Payments, RECONCILE_KIND};

pub use shoal_sandbox::signature::{verify as verify_webhook_signature, SignatureError};
pub use stripe::StripeProvider;

use async_trait::async_trait;

/// What to charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Smallest currency unit (cents).
    pub amount: i64,
    /// ISO 4217, lowercase.
    pub currency: String,
    /// A provider payment method or test card (`pm_card_visa`).
    pub payment_method: String,
    /// Same key, same charge: the provider replays the first result.
    pub idempotency_key: String,
    pub metadata: Vec<(String, String)>,
}

/// What the provider says about a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded {
        provider_id: String,
    },
    /// Not settled yet; a webhook or a later `retrieve` settles it.
    Processing {
        provider_id: String,
    },
    Declined {
        provider_id: Option<String>,
        code: String,
        message: String,
    },
}

/// What the provider holds for one charge: its state, and what it was
/// for (checked against a webhook's claims before they are believed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRecord {
    pub outcome: ChargeOutcome,
    /// Smallest currency unit.
    pub amount: i64,
    pub currency: String,
    /// The `payment_id` of the charge's metadata (Shoal's payment row).
    pub payment_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The outcome is unknown or the provider failed (network error,
    /// timeout, 5xx, 409, 429): retry with the same idempotency key.
    #[error("payment provider unavailable (safe to retry with the same key): {0}")]
    Retryable(String),
    /// The request itself is wrong (bad key, bad parameters): retrying will
    /// not help.
    #[error("payment provider refused the request: {0}")]
    Permanent(String),
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + std::fmt::Debug {
    /// Creates and confirms a charge. Idempotent per `idempotency_key`.
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError>;
    /// The current state of a charge made earlier, and what it was for
    /// (reconciliation; checking a webhook). An unknown id is
    /// `Permanent`.
    async fn retrieve(&self, provider_id: &str) -> Result<ChargeRecord, ProviderError>;
}
