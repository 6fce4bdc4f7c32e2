//! Checks that `docs/gateway.example.toml` loads, validates and builds a
//! gateway, so the documented example can never drift from the code.

use std::path::Path;

#[tokio::test]
async fn documented_example_settings_load_and_bind() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/gateway.example.toml");
    let settings = shoal_core::settings::load(Some(&path), Vec::<(String, String)>::new())
        .expect("docs/gateway.example.toml loads");
    let mut gateway = settings.gateway;
    assert_eq!(gateway.pools.len(), 3);
    assert_eq!(gateway.routes.len(), 4);
    gateway.listen = "127.0.0.1:0".parse().unwrap();
    let bound = shoal_gateway::Gateway::bind(gateway).await;
    assert!(bound.is_ok(), "{:?}", bound.err());
}
