//! `docs/config.schema.json` must be the schema of the current `BusConfig`.
//!
//! Regenerate it with `EVENTBUS_BLESS=1 cargo test -p eventbus-core --test config_schema`.

use std::path::Path;

#[test]
fn committed_schema_is_current() {
    let schema = schemars::schema_for!(eventbus_core::BusConfig);
    let generated = serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.schema.json");
    if std::env::var_os("EVENTBUS_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/config.schema.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/config.schema.json is stale; regenerate it with \
         `EVENTBUS_BLESS=1 cargo test -p eventbus-core --test config_schema` and commit the result"
    );
}

#[test]
fn defaults_pass_through_json_unchanged() {
    let config = eventbus_core::BusConfig::default();
    let json = serde_json::to_string(&config).unwrap();
    let back: eventbus_core::BusConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    assert!(json.contains(r#""close_timeout":"10s""#), "{json}");
}
