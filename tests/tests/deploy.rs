//! The deploy/ manifests: parsed into the Kubernetes API types (tests/manifests/mod.rs),
//! then the fields the agent relies on are checked against the agent itself: its config
//! parser for the ConfigMap, its binary's version for the image tag, and (as root) the
//! real agent run with exactly the DaemonSet's capabilities. The ClusterRole is checked
//! against the agent's actual API requests in tests/kubernetes.rs.

mod manifests;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{HTTPGetAction, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use manifests::Manifests;
use serde_json::json;
use switchyard::config::Config;
use switchyard_tests::{Agent, attached_programs, echo_hosts, host_v4, run, switchyard_bin};

const NAMESPACE_LABEL: &str = "app.kubernetes.io/name";

fn pod_spec(m: &Manifests) -> &k8s_openapi::api::core::v1::PodSpec {
    m.daemon_set.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("DaemonSet pod spec")
}

fn agent_config(m: &Manifests) -> Config {
    Config::parse(m.agent_config(), Path::new("deploy ConfigMap config.yaml"))
        .unwrap_or_else(|e| panic!("the ConfigMap's config is refused by the agent: {e}"))
}

#[test]
fn a_misspelt_field_fails_the_parse() {
    let doc = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "lables": {"a": "b"}}});
    let err = std::panic::catch_unwind(|| manifests::strict::<k8s_openapi::api::core::v1::Namespace>(&doc, "doc"))
        .expect_err("a field the API does not have must fail");
    let msg = err.downcast_ref::<String>().expect("panic message");
    assert!(msg.contains(".metadata.lables"), "{msg}");
}

#[test]
fn every_object_lives_in_the_namespace_applied_first() {
    let m = manifests::load();
    let ns = m.namespace.metadata.name.clone().expect("namespace name");
    let first = m.docs.iter().position(|d| d.kind == "Namespace").expect("Namespace");
    for (i, doc) in m.docs.iter().enumerate() {
        let cluster_scoped = matches!(doc.kind.as_str(), "Namespace" | "ClusterRole" | "ClusterRoleBinding");
        if cluster_scoped {
            assert_eq!(doc.namespace, None, "{doc:?} is cluster-scoped");
        } else {
            assert_eq!(doc.namespace.as_deref(), Some(ns.as_str()), "{doc:?} is not in namespace {ns}");
            assert!(i > first, "{doc:?} is applied before its Namespace (kubectl applies files in name order)");
        }
    }
    let labels = m.namespace.metadata.labels.as_ref().expect("namespace labels");
    assert_eq!(
        labels.get("pod-security.kubernetes.io/enforce").map(String::as_str),
        Some("privileged"),
        "host network, host paths and BPF capabilities need the privileged Pod Security level"
    );
    for meta in [&m.service_account.metadata, &m.cluster_role.metadata, &m.config_map.metadata, &m.daemon_set.metadata]
    {
        assert_eq!(
            meta.labels.as_ref().and_then(|l| l.get(NAMESPACE_LABEL)).map(String::as_str),
            Some("switchyard"),
            "{:?} carries the app label (kubectl delete -l selects by it)",
            meta.name
        );
    }
}

#[test]
fn cluster_role_is_read_only_and_bound_to_the_agents_account() {
    let m = manifests::load();
    let rules = m.cluster_role.rules.as_deref().unwrap_or_default();
    assert!(!rules.is_empty(), "the ClusterRole grants nothing");
    for rule in rules {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert!(verbs.is_subset(&BTreeSet::from(["list", "watch"])), "{rule:?}: only list and watch");
        let named = rule.api_groups.iter().flatten().chain(rule.resources.iter().flatten());
        assert!(named.clone().all(|n| n != "*"), "{rule:?}: no wildcards");
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none(), "{rule:?}: plain resources");
    }
    let sa = &m.service_account.metadata;
    let binding = &m.binding;
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), m.cluster_role.metadata.name.as_ref(), "binding names the role");
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(
        (subjects[0].kind.as_str(), Some(&subjects[0].name), subjects[0].namespace.as_ref()),
        ("ServiceAccount", sa.name.as_ref(), sa.namespace.as_ref()),
        "the binding's subject is the ServiceAccount"
    );
    assert_eq!(pod_spec(&m).service_account_name.as_ref(), sa.name.as_ref(), "the DaemonSet runs as that account");
}

/// host/port/path of an httpGet probe.
fn http_get(probe: Option<&Probe>, which: &str) -> (String, i32, String) {
    let HTTPGetAction { host, port, path, .. } =
        probe.and_then(|p| p.http_get.clone()).unwrap_or_else(|| panic!("{which} probe is an httpGet"));
    let IntOrString::Int(port) = port else { panic!("{which} probe port is a number: no port is declared") };
    (host.unwrap_or_default(), port, path.unwrap_or_default())
}

#[test]
fn config_map_holds_a_valid_config_that_the_pod_spec_agrees_with() {
    let m = manifests::load();
    let config = agent_config(&m);
    let c = m.agent_container();
    let spec = pod_spec(&m);

    // The probes reach the admin API where the config puts it; kubelet shares the host
    // network namespace with the agent, so a loopback host works.
    let admin: SocketAddr = config.agent.admin.expect("the config keeps the admin API on (the probes use it)");
    assert!(admin.ip().is_loopback(), "admin API {admin} stays on loopback");
    let at = |path: &str| (admin.ip().to_string(), i32::from(admin.port()), path.to_owned());
    assert_eq!(http_get(c.startup_probe.as_ref(), "startup"), at("/live"));
    assert_eq!(http_get(c.liveness_probe.as_ref(), "liveness"), at("/live"));
    assert_eq!(http_get(c.readiness_probe.as_ref(), "readiness"), at("/ready"));

    // Kubernetes discovery on, with the node name left to $NODE_NAME from the downward API.
    let k8s = config.agent.kubernetes.as_ref().expect("agent.kubernetes is set");
    assert_eq!((&k8s.kubeconfig, &k8s.node_name), (&None, &None), "in-cluster credentials, $NODE_NAME");
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME env");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");

    // The config file is where the args say, from this ConfigMap.
    let args = c.args.as_deref().unwrap_or_default();
    let at_config = args.iter().position(|a| a == "--config").expect("--config in args");
    let file = PathBuf::from(&args[at_config + 1]);
    assert_eq!(args[0], "run");
    let mount =
        c.volume_mounts.iter().flatten().find(|v| Some(v.mount_path.as_str()) == file.parent().unwrap().to_str());
    let mount = mount.unwrap_or_else(|| panic!("nothing mounted at {}", file.parent().unwrap().display()));
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name).expect("config volume");
    let from = volume.config_map.as_ref().expect("the config volume is a ConfigMap");
    assert_eq!(Some(&from.name), m.config_map.metadata.name.as_ref());
    assert!(m.config_map.data.as_ref().unwrap().contains_key(file.file_name().unwrap().to_str().unwrap()));

    // Open connections drain before the kubelet's SIGKILL, with time to detach and exit.
    let grace = spec.termination_grace_period_seconds.expect("terminationGracePeriodSeconds");
    assert!(
        grace >= config.agent.drain_timeout_secs as i64 + 5,
        "terminationGracePeriodSeconds {grace} leaves no room after drain_timeout_secs {}",
        config.agent.drain_timeout_secs
    );
    // The agent attaches at the cgroup2 root it finds: the host's, mounted over the pod's.
    if let Some(cgroup) = &config.agent.cgroup {
        assert!(cgroup.starts_with("/sys/fs/cgroup"), "agent.cgroup {} is under the host mount", cgroup.display());
    }
}

#[test]
fn daemon_set_has_what_the_agent_relies_on() {
    let m = manifests::load();
    let spec = pod_spec(&m);
    let ds = m.daemon_set.spec.as_ref().unwrap();
    let c = m.agent_container();

    assert_eq!(spec.host_network, Some(true), "the programs redirect connects in the agent's own netns");
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerates_all =
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none() && t.value.is_none()
        });
    assert!(tolerates_all, "a toleration with operator Exists and no key runs the agent on every node");

    let rolling = ds.update_strategy.as_ref().and_then(|u| u.rolling_update.as_ref()).expect("rolling update");
    assert_eq!(ds.update_strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        (rolling.max_surge.clone(), rolling.max_unavailable.clone()),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0))),
        "the new agent starts before the old one stops"
    );
    // A hostPort would make the scheduler refuse the surge pod beside the old one.
    let host_ports: Vec<_> =
        c.ports.iter().flatten().filter(|p| p.host_port.is_some() || spec.host_network == Some(true)).collect();
    assert!(host_ports.is_empty(), "no ports declared on a host-network pod: {host_ports:?}");
    let selector = ds.selector.match_labels.as_ref().expect("selector");
    let labels = ds.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("pod labels");
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "the selector matches the pod template");

    // Capabilities: exactly these (the root test below shows each is needed and enough).
    let sc = c.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]), "drop everything, add back what is needed");
    let added: BTreeSet<String> = m.added_capabilities().into_iter().collect();
    assert_eq!(added, BTreeSet::from(["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]));
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true), "the agent writes nothing in its image");
    assert_eq!(sc.run_as_user, Some(0), "uid 0 owns the host's bpffs and /run/switchyard");

    // Host mounts: (host path, container path, read-only).
    let mounts: Vec<(String, String, bool)> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|vm| {
            let volume = spec.volumes.iter().flatten().find(|v| v.name == vm.name).expect("mounted volume exists");
            let host = volume.host_path.as_ref()?;
            Some((host.path.clone(), vm.mount_path.clone(), vm.read_only == Some(true)))
        })
        .collect();
    for want in [
        ("/sys/fs/cgroup", "/sys/fs/cgroup", true),
        ("/sys/fs/bpf", "/sys/fs/bpf", false),
        ("/run/switchyard", "/run/switchyard", false),
    ] {
        assert!(
            mounts.iter().any(|(h, c, ro)| (h.as_str(), c.as_str(), *ro) == want),
            "host mount {want:?} missing: {mounts:?}"
        );
    }
    assert_eq!(mounts.len(), 3, "no other host paths: {mounts:?}");

    let resources = c.resources.as_ref().expect("resources");
    for (what, set) in [("requests", &resources.requests), ("limits", &resources.limits)] {
        let set = set.as_ref().unwrap_or_else(|| panic!("resource {what}"));
        assert!(set.contains_key("cpu") && set.contains_key("memory"), "{what} name cpu and memory: {set:?}");
    }

    // The image is the version the agent says it is.
    let out = Command::new(switchyard_bin()).arg("--version").output().expect("run switchyard --version");
    let version = String::from_utf8_lossy(&out.stdout).trim().strip_prefix("switchyard ").expect("version").to_owned();
    let image = c.image.as_deref().expect("image");
    assert_eq!(image.rsplit_once(':').map(|(_, tag)| tag), Some(version.as_str()), "image {image}");
}

/// A script that runs the agent with exactly `caps` (as uid 0 does in the pod, where the
/// bounding set is what the container runtime left).
fn with_caps(dir: &Path, caps: &[String]) -> PathBuf {
    let list: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
    let script = dir.join(format!("switchyard-caps{}", list.replace([',', '+'], "-")));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set -all{list} --inh-caps -all -- {} \"$@\"\n",
            switchyard_bin().display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    script
}

#[test]
fn daemon_set_capabilities_are_enough_and_each_is_needed() {
    let test = "daemon_set_capabilities_are_enough_and_each_is_needed";
    let Some((topo, _servers)) = echo_hosts(test, 1) else { return };
    switchyard_tests::require_tools(&["setpriv"]);
    let caps = manifests::load().added_capabilities();
    let config = format!(
        "agent:\n  cgroup: {}\nservices:\n  - {{ name: echo, addresses: [\"10.96.0.10:7000\"], endpoints: [\"{}:7000\"] }}\n",
        topo.cgroup.path.display(),
        host_v4(0)
    );

    let agent = Agent::start_bin(&with_caps(topo.dir.path(), &caps), &topo, &config);
    let probe = topo.probe("10.96.0.10:7000", 1000).ok();
    assert_eq!(probe.get("hello"), Some(format!("{}:7000", host_v4(0)).as_str()), "redirected with {caps:?}");
    // Pods too: the node addresses went on lo with these capabilities alone.
    let mut on_lo = topo.node_addresses_on_lo();
    on_lo.sort();
    assert_eq!(on_lo, ["169.254.83.89", "fd00:5359::1"], "node addresses with {caps:?}");
    let pod = topo.pod("deploy");
    let from_pod = pod.probe("10.96.0.10:7000", 1000).ok();
    assert_eq!(from_pod.get("peer"), Some("10.96.0.10:7000"), "{}", from_pod.stdout);
    let counters = switchyard_tests::kernel_counters(&agent.stop());
    assert_eq!(counters["redirected_pod"], 1, "the pod's connect went through the agent: {counters:?}");
    drop(pod);

    let config_file = topo.dir.path().join("switchyard.yaml");
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut cmd = Command::new(with_caps(topo.dir.path(), &fewer));
        cmd.arg("run").arg("--config").arg(&config_file);
        // Bounded: an agent that starts anyway runs until killed, and `run` then fails
        // the test (the DaemonSet would not need that capability).
        let out = run(topo.in_node(&mut cmd, true), Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the agent started without CAP_{missing}: {stderr}");
        // Not any error: one that names the capability to add.
        assert!(
            stderr.contains("switchyard: error:") && stderr.contains(&format!("is missing CAP_{missing}")),
            "without CAP_{missing} it says that CAP_{missing} is missing: {stderr}"
        );
        let left = attached_programs(&topo.cgroup.path);
        assert!(left.is_empty(), "a refused start left programs attached: {left:?}");
        let addresses = topo.node_addresses_on_lo();
        assert!(addresses.is_empty(), "a refused start left node addresses on lo: {addresses:?}");
    }
}
