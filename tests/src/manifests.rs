//! The install manifests (`manifests/*.yaml`) as typed Kubernetes objects, and what the tests
//! need to run their containers' command lines on a harness node: the argument vector a
//! container's process gets (arguments, explicit environment and ConfigMap environment turned
//! into the flags they stand for), the capabilities it is given, where its mounts come from,
//! and the identity it runs as (the manifest's ServiceAccount, ClusterRole and binding, stored
//! in an API test server that then enforces them).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The workspace's `manifests/` directory.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("manifests")
}

/// Every `*.yaml` file of `manifests/`, sorted.
pub fn files() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("reading manifests/")
        .map(|e| e.expect("manifests/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    out.sort();
    out
}

/// The YAML documents of `path` as JSON values (empty documents left out).
pub fn documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            serde_json::to_value(v).expect("YAML to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `doc` as `K`, and an error naming every field `K` does not know (a typo, a field of another
/// API version): the document must survive a typed round trip unchanged.
pub fn typed<K: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<K, String> {
    let k: K = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&k).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    diff("", doc, &back, &mut lost);
    if lost.is_empty() {
        Ok(k)
    } else {
        Err(format!("fields not kept by the typed object: {lost:?}"))
    }
}

fn diff(at: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => diff(&format!("{at}.{k}"), wv, gv, out),
                    None => out.push(format!("{at}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                diff(&format!("{at}[{i}]"), wv, gv, out);
            }
        }
        (w, g) if w != g => out.push(format!("{at}: {w} became {g}")),
        _ => {}
    }
}

/// The documents of every manifest file of kind `kind`, typed.
pub fn all_of<K: DeserializeOwned + serde::Serialize>(kind: &str) -> Vec<K> {
    files()
        .iter()
        .flat_map(|f| documents(f))
        .filter(|d| d["kind"] == kind)
        .map(|d| typed(&d).unwrap_or_else(|e| panic!("{kind} {}: {e}", d["metadata"]["name"])))
        .collect()
}

/// Namespace and name of the ServiceAccount the agent's DaemonSet (`ferrox`) runs as.
pub fn agent_service_account() -> (String, String) {
    let ds = daemonset("ferrox");
    let account = ds
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.service_account_name.clone())
        .expect("the ferrox DaemonSet names its serviceAccountName");
    let namespace = ds
        .metadata
        .namespace
        .clone()
        .expect("the ferrox DaemonSet has a namespace");
    (namespace, account)
}

/// Stores every ServiceAccount, ClusterRole and ClusterRoleBinding of the manifests in `api`
/// (as `kubectl apply -f manifests/` would; the server then enforces them), and returns a token
/// of the agent's ServiceAccount ([`agent_service_account`]), as the kubelet would project it
/// into the agent's pod.
pub fn install_rbac(api: &crate::apiserver::ApiServer) -> String {
    for account in all_of::<ServiceAccount>("ServiceAccount") {
        api.apply(&account);
    }
    for role in all_of::<ClusterRole>("ClusterRole") {
        api.apply(&role);
    }
    for binding in all_of::<ClusterRoleBinding>("ClusterRoleBinding") {
        api.apply(&binding);
    }
    let (namespace, name) = agent_service_account();
    api.service_account_token(&namespace, &name)
        .expect("the agent's ServiceAccount is in the manifests")
}

pub fn daemonset(name: &str) -> DaemonSet {
    all_of::<DaemonSet>("DaemonSet")
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no DaemonSet {name} in manifests/"))
}

/// A container of `ds` (init containers included).
pub fn container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    let spec = ds.spec.template.spec.as_ref().expect("pod spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Every container of `ds`, init containers included.
pub fn containers(ds: &DaemonSet) -> Vec<&Container> {
    let spec = ds.spec.template.spec.as_ref().expect("pod spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect()
}

/// The capabilities `c` adds (Kubernetes names, e.g. `NET_ADMIN`); `ALL` must be dropped.
pub fn added_capabilities(c: &Container) -> Vec<String> {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref());
    assert!(
        caps.and_then(|c| c.drop.as_ref())
            .is_some_and(|d| d.iter().any(|x| x == "ALL")),
        "container {} must drop ALL capabilities",
        c.name
    );
    caps.and_then(|c| c.add.clone()).unwrap_or_default()
}

/// `setpriv` arguments that give a root process exactly the capabilities of `c`, as a
/// container runtime would (bounding set and inheritable set).
pub fn setpriv_wrapper(c: &Container) -> Vec<String> {
    let caps: String = added_capabilities(c)
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all{caps}"),
        format!("--inh-caps=-all{caps}"),
        "--".into(),
    ]
}

/// The value of an environment variable of `c`: literal, from a ConfigMap key, or (for
/// `fieldRef`) a placeholder the downward API would fill in.
fn env_values(c: &Container, config_maps: &[ConfigMap]) -> Result<Vec<(String, String)>, String> {
    let cm = |name: &str| {
        config_maps
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| {
                format!(
                    "container {} refers to ConfigMap {name}, which is not in the manifests",
                    c.name
                )
            })
    };
    let mut out = Vec::new();
    for from in c.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            for (k, v) in cm(&r.name)?.data.iter().flatten() {
                out.push((k.clone(), v.clone()));
            }
        } else {
            return Err(format!(
                "container {}: envFrom other than a ConfigMap",
                c.name
            ));
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    format!("placeholder-for-{}", f.field_path)
                } else if let Some(k) = &from.config_map_key_ref {
                    cm(&k.name)?
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&k.key))
                        .cloned()
                        .ok_or_else(|| {
                            format!("{}: ConfigMap {} has no key {}", e.name, k.name, k.key)
                        })?
                } else {
                    return Err(format!("{}: unsupported valueFrom", e.name));
                }
            }
            _ => return Err(format!("{}: neither value nor valueFrom", e.name)),
        };
        out.push((e.name.clone(), value));
    }
    Ok(out)
}

/// The command line `c`'s process runs (`ferrox` and the container's arguments), with each
/// environment variable the container sets turned into the flag that reads it, checked by
/// `ferrox`'s own parser. Fails when a variable is one no flag of the subcommand reads, or when
/// the parser rejects the result (unknown flag, bad value, a flag given twice).
pub fn argv(c: &Container, config_maps: &[ConfigMap]) -> Result<Vec<String>, String> {
    if let Some(cmd) = &c.command {
        return Err(format!(
            "container {} overrides the image's entrypoint with {cmd:?}",
            c.name
        ));
    }
    let mut argv = vec!["ferrox".to_owned()];
    argv.extend(c.args.iter().flatten().cloned());
    let root = ferrox::cli::Cli::command();
    let sub_name = argv.get(1).ok_or("no subcommand")?.clone();
    let sub = root
        .find_subcommand(&sub_name)
        .ok_or_else(|| format!("`ferrox {sub_name}` is not a subcommand"))?;
    for (name, value) in env_values(c, config_maps)? {
        let arg = sub
            .get_arguments()
            .chain(root.get_arguments())
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .ok_or_else(|| {
                format!(
                    "container {}: `ferrox {sub_name}` reads no environment variable {name}",
                    c.name
                )
            })?;
        let long = arg.get_long().ok_or("an env flag without a long name")?;
        argv.push(format!("--{long}={value}"));
    }
    <ferrox::cli::Cli as clap::Parser>::try_parse_from(&argv)
        .map_err(|e| format!("container {}: {argv:?}: {e}", c.name))?;
    Ok(argv)
}

/// Where the container path `path` of `c` comes from on the node: the `hostPath` of the
/// volume mounted at the longest prefix of `path`, plus the rest of `path`.
pub fn host_path(ds: &DaemonSet, c: &Container, path: &str) -> Option<String> {
    let spec = ds.spec.template.spec.as_ref()?;
    let volumes: BTreeMap<&str, String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.clone())))
        .collect();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path == m.mount_path || path.starts_with(&format!("{}/", m.mount_path)))
        .max_by_key(|m| m.mount_path.len())?;
    let host = volumes.get(m.name.as_str())?;
    Some(format!("{host}{}", &path[m.mount_path.len()..]))
}

/// `argv` with every absolute path in a `--flag=/path` argument replaced by `map(host path)`:
/// the container's command line, run on a node whose root filesystem is elsewhere.
pub fn remap_paths(
    ds: &DaemonSet,
    c: &Container,
    argv: &[String],
    map: impl Fn(&str) -> PathBuf,
) -> Vec<String> {
    argv.iter()
        .map(|a| match a.split_once('=') {
            Some((flag, value)) if value.starts_with('/') => {
                let host = host_path(ds, c, value).unwrap_or_else(|| {
                    panic!(
                        "{flag}={value}: no host volume of container {} holds it",
                        c.name
                    )
                });
                format!("{flag}={}", map(&host).display())
            }
            _ => a.clone(),
        })
        .collect()
}
