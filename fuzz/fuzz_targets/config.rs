//! `Config::parse` on any text: a config or an error, never a panic (the error's message
//! included). A config it accepts, written back as YAML (as `GET /config` shows it, less
//! each service's `origin`, which a file cannot set), parses again to the same config:
//! what the agent reports is a config it would accept.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use switchyard::config::Config;

fuzz_target!(|text: &str| {
    let path = Path::new("fuzz.yaml");
    let config = match Config::parse(text, path) {
        Ok(config) => config,
        Err(e) => {
            let _ = format!("{:?}", anyhow_like(&e));
            return;
        }
    };
    let mut value = serde_yaml_ng::to_value(&config).expect("a parsed config serializes");
    if let Some(services) = value.get_mut("services").and_then(|s| s.as_sequence_mut()) {
        for service in services.iter_mut().filter_map(|s| s.as_mapping_mut()) {
            service.remove("origin");
        }
    }
    let written = serde_yaml_ng::to_string(&value).expect("YAML of a config");
    match Config::parse(&written, path) {
        Ok(again) => assert_eq!(again, config, "the config written back as\n{written}\nreads differently"),
        Err(e) => panic!("the config written back as\n{written}\nis refused: {:?}", anyhow_like(&e)),
    }
});

/// The error and its sources, as the agent prints them.
fn anyhow_like(e: &dyn std::error::Error) -> Vec<String> {
    std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string).collect()
}
