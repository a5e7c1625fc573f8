//! The `deploy/` manifests, parsed into k8s-openapi's types in `kubectl apply -f deploy/`
//! order (files by name, documents in file order). Shared by tests/deploy.rs (the fields
//! the agent relies on), tests/kubernetes.rs (the agent's API requests against the
//! ClusterRole) and tests/image.rs (the image checks the ConfigMap's config). A module of
//! the test targets, not of the harness library, so xtask does not build its
//! dependencies.
// Each test target uses a different part.
#![allow(dead_code)]
//!
//! k8s-openapi's types ignore fields they do not know, as the API server's non-strict
//! decoding does; a misspelt field (`hostNetwrok: true`) would then vanish silently. So
//! every document is also serialised back and must still hold everything it said.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// One document: where it came from and what it is.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

/// Every object in deploy/, one of each kind.
pub struct Manifests {
    /// Apply order.
    pub docs: Vec<Doc>,
    pub namespace: Namespace,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub binding: ClusterRoleBinding,
    pub config_map: ConfigMap,
    pub daemon_set: DaemonSet,
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Parse deploy/*.yaml; panics naming the file and document on anything wrong.
pub fn load() -> Manifests {
    let dir = deploy_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());

    let mut docs = Vec::new();
    let (mut ns, mut sa, mut role, mut binding, mut cm, mut ds) = (None, None, None, None, None, None);
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let at = format!("{file} document {}", i + 1);
            let value = Value::deserialize(de).unwrap_or_else(|e| panic!("{at}: not YAML: {e}"));
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_else(|| panic!("{at}: no kind")).to_owned();
            let meta = &value["metadata"];
            docs.push(Doc {
                file: file.clone(),
                kind: kind.clone(),
                namespace: meta["namespace"].as_str().map(str::to_owned),
                name: meta["name"].as_str().unwrap_or_else(|| panic!("{at}: no metadata.name")).to_owned(),
            });
            let at = format!("{at} ({kind})");
            match kind.as_str() {
                "Namespace" => once(&mut ns, strict(&value, &at), &at),
                "ServiceAccount" => once(&mut sa, strict(&value, &at), &at),
                "ClusterRole" => once(&mut role, strict(&value, &at), &at),
                "ClusterRoleBinding" => once(&mut binding, strict(&value, &at), &at),
                "ConfigMap" => once(&mut cm, strict(&value, &at), &at),
                "DaemonSet" => once(&mut ds, strict(&value, &at), &at),
                other => panic!("{at}: unexpected kind {other}; teach tests/src/manifests.rs about it"),
            }
        }
    }
    let missing = |what: &str| -> ! { panic!("deploy/ has no {what}") };
    Manifests {
        docs,
        namespace: ns.unwrap_or_else(|| missing("Namespace")),
        service_account: sa.unwrap_or_else(|| missing("ServiceAccount")),
        cluster_role: role.unwrap_or_else(|| missing("ClusterRole")),
        binding: binding.unwrap_or_else(|| missing("ClusterRoleBinding")),
        config_map: cm.unwrap_or_else(|| missing("ConfigMap")),
        daemon_set: ds.unwrap_or_else(|| missing("DaemonSet")),
    }
}

impl Manifests {
    /// The DaemonSet's one container.
    pub fn agent_container(&self) -> &Container {
        let spec = self.daemon_set.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
        assert_eq!(spec.containers.len(), 1, "the agent pod has one container");
        &spec.containers[0]
    }

    /// Capabilities the agent container adds (`BPF`, `NET_ADMIN`, ...).
    pub fn added_capabilities(&self) -> Vec<String> {
        let caps = self.agent_container().security_context.as_ref().and_then(|s| s.capabilities.as_ref());
        caps.and_then(|c| c.add.clone()).unwrap_or_default()
    }

    /// The agent's config file, from the ConfigMap.
    pub fn agent_config(&self) -> &str {
        self.config_map.data.as_ref().and_then(|d| d.get("config.yaml")).expect("ConfigMap data config.yaml")
    }
}

fn once<T>(slot: &mut Option<T>, value: T, at: &str) {
    assert!(slot.replace(value).is_none(), "{at}: a second object of this kind");
}

/// Parse into `T` and require that nothing was dropped on the way; panics naming the
/// paths that were (`at` says which document).
pub fn strict<T: DeserializeOwned + Serialize>(value: &Value, at: &str) -> T {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let back = serde_json::to_value(&typed).expect("serialise");
    let mut lost = Vec::new();
    dropped(value, &back, String::new(), &mut lost);
    assert!(lost.is_empty(), "{at}: fields the API types do not have (misspelt?) or read differently: {lost:?}");
    typed
}

/// Paths of `ours` that `back` lacks or holds a different scalar at.
fn dropped(ours: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (ours, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => dropped(v, w, format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                dropped(v, w, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        _ => out.push(path),
    }
}
