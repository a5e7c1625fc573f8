//! The agent's picture of the world: which service owns each service address, and its
//! endpoints. Pure data and lookups; built once from a config and shared as an `Arc`.
//! (Live updates arrive with discovery; the data path will then read the latest snapshot.)

use std::{collections::HashMap, net::SocketAddr};

use crate::{balance::RoundRobin, config::Config};

/// One logical service.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub endpoints: Vec<SocketAddr>,
    pub balancer: RoundRobin,
}

/// Every service, indexed by service address.
#[derive(Debug, Default)]
pub struct Snapshot {
    services: Vec<Service>,
    by_addr: HashMap<SocketAddr, usize>,
}

impl Snapshot {
    /// Build from a validated config (addresses are unique and canonical there).
    pub fn from_config(config: &Config) -> Self {
        let mut snap = Self::default();
        for (id, svc) in config.services.iter().enumerate() {
            for addr in &svc.addresses {
                snap.by_addr.insert(*addr, id);
            }
            snap.services.push(Service {
                name: svc.name.clone(),
                addresses: svc.addresses.clone(),
                endpoints: svc.endpoints.clone(),
                balancer: RoundRobin::default(),
            });
        }
        snap
    }

    /// The service a connection to `dst` is for. v4-mapped destinations match their IPv4
    /// service address.
    pub fn service_for(&self, dst: SocketAddr) -> Option<&Service> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.by_addr.get(&dst).map(|&i| &self.services[i])
    }

    /// (service index, service address) pairs, for the kernel's services map.
    pub fn service_addresses(&self) -> impl Iterator<Item = (u32, SocketAddr)> + '_ {
        self.services.iter().enumerate().flat_map(|(i, s)| s.addresses.iter().map(move |a| (i as u32, *a)))
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn lookup_by_any_spelling_of_a_service_address() {
        let config = Config::parse(
            "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\", \"[fd96::1]:80\"]\n    endpoints: [\"10.0.0.1:8080\"]\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let snap = Snapshot::from_config(&config);
        for dst in ["10.96.0.1:80", "[::ffff:10.96.0.1]:80", "[fd96::1]:80"] {
            assert_eq!(snap.service_for(dst.parse().unwrap()).map(|s| s.name.as_str()), Some("web"), "{dst}");
        }
        assert!(snap.service_for("10.96.0.1:81".parse().unwrap()).is_none());
        assert_eq!(snap.service_addresses().count(), 2);
    }
}
