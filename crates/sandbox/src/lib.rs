//! The payment sandbox: a small Stripe-compatible provider that Shoal runs
//! for development and tests (`shoal sandbox`, and `shoal up` by default).
//!
//! It speaks the subset of Stripe's API that Shoal uses:
//! `POST /v1/payment_intents` (form-encoded; `amount`, `currency`,
//! `payment_method`, `metadata[...]`; header `Idempotency-Key`) and
//! `GET /v1/payment_intents/{id}`, with bearer-key auth and Stripe's error
//! shape. Idempotency follows Stripe: the same key with the same parameters
//! replays the first response; with other parameters it is a 400
//! `idempotency_error`; while the first is in progress, a 409. A request
//! runs to completion even when its client hangs up (a worker killed
//! mid-charge), so the retry finds its response; a key left in progress by
//! a sandbox that stopped mid-request is released after a minute.
//!
//! Test payment methods: `pm_card_visa` (succeeds), `pm_card_chargeDeclined`
//! (402 `card_declined`), `pm_card_slow` (succeeds after `sandbox.slow_ms`),
//! `pm_card_processing` (`processing`, settled by webhook a moment later),
//! `pm_card_lost_response` (charges, then stalls the response for 30 s, as
//! a network failure after the charge would), `pm_card_error` (500 before
//! charging). Faults for the next N requests can also be set at
//! `POST /_sandbox/faults`. `GET /_sandbox/charges` lists every charge, so
//! tests can count them.
//!
//! Webhooks (`payment_intent.succeeded`, `payment_intent.payment_failed`)
//! are signed as Stripe signs them: `Stripe-Signature: t=<unix>,v1=<hex
//! HMAC-SHA256(secret, "<t>.<body>")>`, and retried with backoff.

mod api;
pub mod signature;

pub use api::{Sandbox, SandboxHandle};
