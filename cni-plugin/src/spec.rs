//! The CNI protocol (spec 1.1, also accepting 0.4.0 and 1.0.0 configurations): the runtime's
//! environment, the network configuration on stdin, the result and error JSON on stdout.
//! Pure types and parsing; nothing here touches the system.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The newest version this plugin speaks (its errors and VERSION answer use it when the runtime
/// named none).
pub const CNI_VERSION: &str = "1.1.0";
/// Every version this plugin speaks, oldest first; a result has the shape of the version the
/// configuration names ([`AddResult::to_json`]).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The version a network configuration names for runtimes whose libcni predates CNI 1.1
/// (containerd 1.6 and 1.7, CRI-O before libcni 1.2): they refuse a 1.1.0 result.
pub const COMPATIBLE_VERSION: &str = "1.0.0";

/// Well-known error codes of the CNI specification, and ours (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The node's address block has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 100;
    /// The datapath (pinned programs or maps) could not be used.
    pub const DATAPATH: u32 = 101;
    /// CHECK: the attachment is not what ADD made (the message names every difference).
    pub const ATTACHMENT_DIFFERS: u32 = 102;
}

/// A CNI error: printed as the spec's error JSON, with a message that says what to fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds the underlying error chain as `details`.
    pub fn with_source(mut self, e: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = vec![e.to_string()];
        let mut src = e.source();
        while let Some(s) = src {
            chain.push(s.to_string());
            src = s.source();
        }
        self.details = chain.join(": ");
        self
    }

    /// The error JSON for stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        let v = serde_json::json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details });
        let mut v = v;
        if self.details.is_empty()
            && let Some(o) = v.as_object_mut()
        {
            o.remove("details");
        }
        v.to_string()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// The `CNI_*` environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads the invocation from environment variables (`get` is `std::env::var` in the binary).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!("unknown CNI_COMMAND {other:?}"),
                ));
            }
            None => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    "CNI_COMMAND is not set",
                ));
            }
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| -> Result<String, CniError> {
            match get(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if needs_container => Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!("{name} is required for this command"),
                )),
                _ => Ok(String::new()),
            }
        };
        let container_id = required("CNI_CONTAINERID")?;
        let ifname = required("CNI_IFNAME")?;
        if ifname.len() > 15 || ifname.contains('/') {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
            ));
        }
        // ADD and CHECK need the namespace; DEL must work without it (it may be gone already).
        let netns = get("CNI_NETNS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_NETNS is required for this command",
            ));
        }
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    pub fn pod(&self) -> PodRef {
        PodRef {
            namespace: self
                .args
                .get("K8S_POD_NAMESPACE")
                .cloned()
                .unwrap_or_default(),
            name: self.args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        }
    }
}

/// `K1=V1;K2=V2`.
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// The network configuration on stdin.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Path of the node configuration written by the agent.
    #[serde(default)]
    pub node_config: Option<PathBuf>,
    /// Passed through to the result.
    #[serde(default)]
    pub dns: Option<serde_json::Value>,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// An IPAM section: ferrox allocates from its own store, so one here is refused (code 2)
    /// rather than silently ignored.
    #[serde(default)]
    pub ipam: Option<serde_json::Value>,
    /// GC: the attachments the runtime still knows.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// What the runtime passes for the capabilities this plugin's entry declares.
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
}

/// `runtimeConfig`: the `bandwidth` capability (the pod's `kubernetes.io/*-bandwidth`
/// annotations, as the kubelet hands them to the runtime).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
}

/// Rates in bits per second and bursts in bits, as the reference `bandwidth` plugin takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    #[serde(default)]
    pub ingress_rate: u64,
    #[serde(default)]
    pub ingress_burst: u64,
    #[serde(default)]
    pub egress_rate: u64,
    #[serde(default)]
    pub egress_burst: u64,
}

impl NetConf {
    /// Whether the reference `bandwidth` plugin chained after this one will shape the pod's
    /// egress: it then adds an `ingress` qdisc to the host veth (exclusively, so a clsact qdisc
    /// already there makes it fail), and the pod program must be a TCX link instead of a filter.
    pub fn pod_egress_is_shaped(&self) -> bool {
        self.runtime_config
            .bandwidth
            .as_ref()
            .is_some_and(|b| b.egress_rate > 0 && b.egress_burst > 0)
    }

    /// Whether that plugin shapes the pod's traffic in either direction (traffic to the pod: a
    /// token bucket on the host veth, which packets delivered with `bpf_redirect_peer` would
    /// skip).
    pub fn pod_is_shaped(&self) -> bool {
        self.pod_egress_is_shaped()
            || self
                .runtime_config
                .bandwidth
                .as_ref()
                .is_some_and(|b| b.ingress_rate > 0 && b.ingress_burst > 0)
    }
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                "the network configuration on stdin is not valid JSON of the expected shape",
            )
            .with_source(&e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {} is not supported; this plugin supports {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf
            .ipam
            .as_ref()
            .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty()))
        {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "ferrox-cni allocates addresses from its own IPAM store; remove the \"ipam\" section",
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_NETWORK_CONFIG,
                "the network configuration has no name",
            ));
        }
        Ok(conf)
    }
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: Ipv4Net,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub dst: Ipv4Net,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gw: Option<Ipv4Addr>,
}

/// The ADD result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dns: Option<serde_json::Value>,
}

impl AddResult {
    /// The result as version `self.cni_version` shapes it: 1.1.0 as is; 1.0.0 without the
    /// interface MTU (new in 1.1.0); 0.4.0 also with each address's IP `version`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "cniVersion": self.cni_version,
            "interfaces": self.interfaces,
            "ips": self.ips,
            "routes": self.routes,
        });
        if let Some(dns) = &self.dns {
            json["dns"] = dns.clone();
        }
        if self.cni_version != "1.1.0"
            && let Some(ifs) = json["interfaces"].as_array_mut()
        {
            for i in ifs.iter_mut().filter_map(|i| i.as_object_mut()) {
                i.remove("mtu");
            }
        }
        if self.cni_version == "0.4.0"
            && let Some(ips) = json["ips"].as_array_mut()
        {
            for ip in ips {
                ip["version"] = "4".into();
            }
        }
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_take_the_shape_of_the_configured_version() {
        let result = |v: &str| AddResult {
            cni_version: v.into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: Some(1480),
                sandbox: Some("/run/netns/p".into()),
            }],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![],
            dns: None,
        };
        for (version, mtu, ip_version) in [
            ("1.1.0", Some(1480u32), None),
            ("1.0.0", None, None),
            ("0.4.0", None, Some("4")),
        ] {
            let json = result(version).to_json();
            assert_eq!(json["cniVersion"], version);
            assert_eq!(
                json["interfaces"][0]["mtu"].as_u64(),
                mtu.map(u64::from),
                "{version}"
            );
            assert_eq!(json["ips"][0]["version"].as_str(), ip_version, "{version}");
            assert_eq!(json["ips"][0]["address"], "10.244.1.5/32");
            assert!(json.get("dns").is_none());
            // What the plugin printed reads back as a prevResult (CHECK).
            let back: AddResult = serde_json::from_value(json).unwrap();
            assert_eq!(back.ips, result(version).ips);
        }
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn reads_an_add_invocation_with_pod_args() {
        let inv = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/pod1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(
            inv.pod(),
            PodRef {
                namespace: "default".into(),
                name: "web-0".into()
            }
        );
    }

    #[test]
    fn del_works_without_a_netns_but_add_does_not() {
        let del = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(del.netns, None);
        let add = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
        ]));
        assert_eq!(add.unwrap_err().code, code::INVALID_ENVIRONMENT);
    }

    #[test]
    fn bad_environment_gets_code_4_with_the_variable_named() {
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(e.code, 4);
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "nonsense")]))
            .unwrap_err();
        assert_eq!(e.code, 4);
    }

    #[test]
    fn config_versions_and_shape_are_checked() {
        let ok = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"ferrox","type":"ferrox-cni","dns":{"nameservers":["10.96.0.10"]}}"#).unwrap();
        assert_eq!(ok.dns.unwrap()["nameservers"][0], "10.96.0.10");
        let old = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"ferrox","type":"ferrox-cni"}"#)
            .unwrap_err();
        assert_eq!(old.code, code::INCOMPATIBLE_VERSION);
        assert!(old.msg.contains("1.1.0"), "{old}");
        let garbage = NetConf::parse(b"{").unwrap_err();
        assert_eq!(garbage.code, code::DECODING_FAILURE);
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(7, "bad config");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.1.0", "code": 7, "msg": "bad config"})
        );
    }
}
