//! The Stripe adapter against the bundled sandbox: outcomes, error classes
//! and exactly one charge when a response is lost and the call retried.

use shoal_backends::Database;
use shoal_core::settings::SandboxSettings;
use shoal_payments::{
    ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, StripeProvider,
};
use shoal_sandbox::Sandbox;
use shoal_testkit as kit;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn sandbox() -> (String, CancellationToken, kit::TempDir) {
    let dir = kit::TempDir::new("stripe");
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    let settings = SandboxSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..SandboxSettings::default()
    };
    let sb = Sandbox::bind(settings, db).await.unwrap();
    let base = format!("http://{}", sb.handle().addr);
    let stop = CancellationToken::new();
    tokio::spawn(sb.run(stop.clone()));
    (base, stop, dir)
}

fn request(key: &str, pm: &str) -> ChargeRequest {
    ChargeRequest {
        amount: 4200,
        currency: "eur".into(),
        payment_method: pm.into(),
        idempotency_key: key.into(),
        metadata: vec![("order_id".into(), "ord_9".into())],
    }
}

async fn charges(base: &str) -> u64 {
    let v: serde_json::Value = reqwest::get(format!("{base}/_sandbox/charges"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap()
}

#[tokio::test]
async fn outcomes_and_error_classes() {
    let (base, _stop, _dir) = sandbox().await;
    let p = StripeProvider::new(&base, "sk_test_shoal", Duration::from_secs(5));
    let ok = p.charge(&request("a", "pm_card_visa")).await.unwrap();
    let ChargeOutcome::Succeeded { provider_id } = ok else {
        panic!("expected success, got {ok:?}")
    };
    assert!(provider_id.starts_with("pi_"));
    let record = p.retrieve(&provider_id).await.unwrap();
    assert_eq!(
        record.outcome,
        ChargeOutcome::Succeeded {
            provider_id: provider_id.clone()
        }
    );
    assert_eq!(record.amount, request("a", "pm_card_visa").amount);
    // An id that is not one path segment is refused before any request.
    assert!(matches!(
        p.retrieve("../v1/charges").await,
        Err(shoal_payments::ProviderError::Permanent(_))
    ));
    assert!(matches!(
        p.retrieve("pi_doesnotexist").await,
        Err(shoal_payments::ProviderError::Permanent(_))
    ));
    match p
        .charge(&request("b", "pm_card_chargeDeclined"))
        .await
        .unwrap()
    {
        ChargeOutcome::Declined { code, .. } => assert_eq!(code, "card_declined"),
        other => panic!("expected decline, got {other:?}"),
    }
    assert!(matches!(
        p.charge(&request("c", "pm_card_error")).await,
        Err(ProviderError::Retryable(_))
    ));
    assert!(matches!(
        p.charge(&request("d", "pm_card_unknown")).await,
        Err(ProviderError::Permanent(_))
    ));
    let bad_key = StripeProvider::new(&base, "sk_test_wrong", Duration::from_secs(5));
    assert!(matches!(
        bad_key.charge(&request("e", "pm_card_visa")).await,
        Err(ProviderError::Permanent(_))
    ));
    let nowhere = StripeProvider::new("http://127.0.0.1:1", "k", Duration::from_millis(500));
    assert!(matches!(
        nowhere.charge(&request("f", "pm_card_visa")).await,
        Err(ProviderError::Retryable(_))
    ));
}

#[tokio::test]
async fn a_lost_response_retried_with_the_same_key_is_one_charge() {
    let (base, _stop, _dir) = sandbox().await;
    let impatient = StripeProvider::new(&base, "sk_test_shoal", Duration::from_millis(400));
    let first = impatient
        .charge(&request("order-1", "pm_card_lost_response"))
        .await;
    assert!(
        matches!(first, Err(ProviderError::Retryable(_))),
        "{first:?}"
    );
    let p = StripeProvider::new(&base, "sk_test_shoal", Duration::from_secs(5));
    let second = p
        .charge(&request("order-1", "pm_card_lost_response"))
        .await
        .unwrap();
    assert!(matches!(second, ChargeOutcome::Succeeded { .. }));
    assert_eq!(charges(&base).await, 1);
}
