//! The `[payments]` and `[sandbox]` settings sections: which payment
//! provider the payments service charges through, and the bundled sandbox
//! provider that `shoal up` runs for development and tests.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The API key every Shoal build knows: the default of `payments.api_key`
/// and `sandbox.api_key`. Only a development run may use it.
pub const DEVELOPMENT_API_KEY: &str = "sk_test_shoal";
/// The webhook secret every Shoal build knows (`payments.webhook_secret`,
/// `sandbox.webhook_secret`). Only a development run may use it.
pub const DEVELOPMENT_WEBHOOK_SECRET: &str = "whsec_shoal_development";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsSettings {
    /// Base URL of a Stripe-compatible API: the sandbox's (what `shoal up`
    /// sets) or `https://api.stripe.com`.
    pub provider_url: String,
    /// Secret API key sent as a bearer token.
    pub api_key: String,
    /// Secret that signs provider webhooks (`Stripe-Signature`).
    pub webhook_secret: String,
    /// Webhooks older or newer than this many seconds are refused.
    pub webhook_tolerance_secs: u64,
    /// Timeout of one call to the provider, ms.
    pub request_timeout_ms: u64,
}

impl Default for PaymentsSettings {
    fn default() -> Self {
        PaymentsSettings {
            provider_url: "http://127.0.0.1:8095".into(),
            api_key: DEVELOPMENT_API_KEY.into(),
            webhook_secret: DEVELOPMENT_WEBHOOK_SECRET.into(),
            webhook_tolerance_secs: 300,
            request_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    pub listen: SocketAddr,
    /// Where the sandbox sends signed webhooks (e.g. the gateway's
    /// `/api/payments/webhooks`); none when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Secret the sandbox signs webhooks with (must match
    /// `payments.webhook_secret`).
    pub webhook_secret: String,
    /// API key the sandbox accepts (must match `payments.api_key`).
    pub api_key: String,
    /// How long `pm_card_slow` takes, ms.
    pub slow_ms: u64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            listen: "127.0.0.1:8095".parse().unwrap(),
            webhook_url: None,
            webhook_secret: DEVELOPMENT_WEBHOOK_SECRET.into(),
            api_key: DEVELOPMENT_API_KEY.into(),
            slow_ms: 3_000,
        }
    }
}
