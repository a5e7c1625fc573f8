//! The catalog file's parser (`discovery::catalog::parse`) on any text: services or an
//! error, never a panic. A catalog is the config file's `services:` part on its own, so
//! text the catalog accepts is a config file the agent accepts, with the same services
//! (marked as the catalog's).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use switchyard::{
    config::{Config, Origin},
    discovery::catalog,
};

fuzz_target!(|text: &str| {
    let path = Path::new("catalog.yaml");
    let services = match catalog::parse(text, path) {
        Ok(services) => services,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(services.iter().all(|s| s.origin == Origin::Catalog), "every service is marked as the catalog's");
    let config = Config::parse(text, path).unwrap_or_else(|e| panic!("a catalog the config parser refuses: {e:?}"));
    let as_catalog: Vec<_> = config
        .services
        .into_iter()
        .map(|s| switchyard::config::ServiceConfig { origin: Origin::Catalog, ..s })
        .collect();
    assert_eq!(as_catalog, services, "the catalog and the config file read the same services differently");
});
