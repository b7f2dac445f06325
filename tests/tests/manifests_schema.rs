//! The install manifests apply on every Kubernetes version README.md claims ("Supported
//! versions"): every document of every `manifests/*.yaml` is checked against the published API
//! of the lowest and of the highest supported version as `kubectl apply` has the API server
//! check it (strict field validation): no unknown field, no value of the wrong type, a kind the
//! version serves, CustomResourceDefinitions valid and structural. Offline and unprivileged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use ferrox_tests::{
    api_schema::{HIGHEST, LOWEST, Problem, SUPPORTED, Version, structural, yaml},
    manifests,
};
use serde_json::{Value, json};

/// `Kind namespace/name` of a document, for messages.
fn describe(doc: &Value) -> String {
    let meta = &doc["metadata"];
    let name = meta["name"].as_str().unwrap_or("?");
    match meta["namespace"].as_str() {
        Some(ns) => format!("{} {ns}/{name}", doc["kind"].as_str().unwrap_or("?")),
        None => format!("{} {name}", doc["kind"].as_str().unwrap_or("?")),
    }
}

fn file_name(path: &Path) -> String {
    format!("manifests/{}", path.file_name().unwrap().to_string_lossy())
}

#[test]
fn every_manifest_document_applies_on_the_lowest_and_highest_supported_kubernetes() {
    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for f in manifests::files() {
        // What kubectl sends is what is checked: no scalar it reads otherwise than serde_yaml.
        let text = std::fs::read_to_string(&f).unwrap();
        for (line, plain, reading) in yaml::yaml11_divergences(&text) {
            failures.push(format!(
                "{}:{line}: kubectl reads `{plain}` as {reading} (YAML 1.1): quote it\n",
                file_name(&f)
            ));
        }
        for (i, doc) in manifests::documents(&f).iter().enumerate() {
            for version in SUPPORTED {
                if let Err(problems) = version.check(doc) {
                    failures.push(format!(
                        "{}, document {} ({}), Kubernetes {}:\n{}",
                        file_name(&f),
                        i + 1,
                        describe(doc),
                        version.name,
                        problems
                            .iter()
                            .map(|p| format!("    {p}\n"))
                            .collect::<String>()
                    ));
                }
            }
            if doc["kind"] == "CustomResourceDefinition" {
                for p in structural::printer_columns_without_field(doc) {
                    failures.push(format!("{}, {}: {p}", file_name(&f), describe(doc)));
                }
            }
            checked.push(format!("{} {}", file_name(&f), describe(doc)));
        }
    }
    assert!(
        failures.is_empty(),
        "the API server would reject these documents:\n{}",
        failures.join("")
    );
    // Every file and kind the manifests hold was seen (an empty glob would pass vacuously).
    for want in [
        "manifests/ferrox.yaml CustomResourceDefinition ipamblocks.ipam.ferrox.io",
        "manifests/ferrox.yaml CustomResourceDefinition bgppeers.bgp.ferrox.io",
        "manifests/ferrox.yaml ServiceAccount kube-system/ferrox",
        "manifests/ferrox.yaml ClusterRole ferrox",
        "manifests/ferrox.yaml ClusterRoleBinding ferrox",
        "manifests/ferrox.yaml ConfigMap kube-system/ferrox-config",
        "manifests/ferrox.yaml DaemonSet kube-system/ferrox",
        "manifests/ferrox-uninstall.yaml DaemonSet kube-system/ferrox-uninstall",
    ] {
        assert!(checked.iter().any(|c| c == want), "{want} in {checked:#?}");
    }
    eprintln!(
        "{} documents apply on Kubernetes {} and {}: {checked:#?}",
        checked.len(),
        LOWEST.name,
        HIGHEST.name
    );
}

#[test]
fn readme_states_the_range_the_manifests_are_checked_on() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = readme
        .split("### Supported versions")
        .nth(1)
        .expect("README.md has a \"### Supported versions\" subsection")
        .split("\n#")
        .next()
        .unwrap();
    let range = format!("Kubernetes {} to {}", LOWEST.name, HIGHEST.name);
    assert!(
        section.contains(&range),
        "README's Supported versions names the range the test checks, {range:?}:\n{section}"
    );
}

// ---- The check fails on what the API server rejects, with the offending field's path. ----

/// The document of `kind` named `name` in `manifests/<file>`, changed by `change`.
fn mutated(file: &str, kind: &str, name: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut doc = manifests::documents(&manifests::dir().join(file))
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} in {file}"));
    change(&mut doc);
    doc
}

/// `version` rejects `doc` with a problem at exactly `path` whose message contains `says`.
fn rejects(version: &Version, doc: &Value, path: &str, says: &str) -> Vec<Problem> {
    let problems = version.check(doc).expect_err(&format!(
        "Kubernetes {} accepts {}",
        version.name,
        describe(doc)
    ));
    assert!(
        problems
            .iter()
            .any(|p| p.path == path && p.message.contains(says)),
        "Kubernetes {}: want {path}: ...{says}..., got {problems:#?}",
        version.name
    );
    problems
}

fn pod_spec(doc: &mut Value) -> &mut Value {
    &mut doc["spec"]["template"]["spec"]
}

#[test]
fn a_misspelled_field_fails_with_its_path_on_every_version() {
    let doc = mutated("ferrox.yaml", "DaemonSet", "ferrox", |d| {
        pod_spec(d)["hostNetwrok"] = true.into();
        pod_spec(d)["containers"][0]["securityContext"]["capabilities"]["ad"] = json!(["BPF"]);
    });
    for v in SUPPORTED {
        let problems = rejects(v, &doc, ".spec.template.spec.hostNetwrok", "unknown field");
        // Every unknown field is named, not only the first.
        assert!(
            problems
                .iter()
                .any(|p| p.path
                    == ".spec.template.spec.containers[0].securityContext.capabilities.ad"),
            "{problems:#?}"
        );
    }
    // In the uninstall DaemonSet's init container (its security context is a YAML anchor).
    let doc = mutated(
        "ferrox-uninstall.yaml",
        "DaemonSet",
        "ferrox-uninstall",
        |d| {
            pod_spec(d)["initContainers"][0]["securityContext"]["apparmorProfile"] =
                json!({ "type": "Unconfined" });
        },
    );
    for v in SUPPORTED {
        rejects(
            v,
            &doc,
            ".spec.template.spec.initContainers[0].securityContext.apparmorProfile",
            "unknown field",
        );
    }
}

#[test]
fn a_value_of_the_wrong_type_fails_with_its_path() {
    // A port as a string where an int32 belongs.
    let doc = mutated("ferrox.yaml", "DaemonSet", "ferrox", |d| {
        pod_spec(d)["containers"][0]["ports"][0]["containerPort"] = "10256".into();
    });
    for v in SUPPORTED {
        rejects(
            v,
            &doc,
            ".spec.template.spec.containers[0].ports[0].containerPort",
            "invalid type: string \"10256\"",
        );
    }
    // An unquoted number in the ConfigMap, where only strings go.
    let doc = mutated("ferrox.yaml", "ConfigMap", "ferrox-config", |d| {
        d["data"]["FERROX_MTU"] = 1500.into();
    });
    for v in SUPPORTED {
        rejects(v, &doc, ".data.FERROX_MTU", "invalid type: integer `1500`");
    }
    // A list where one verb belongs.
    let doc = mutated("ferrox.yaml", "ClusterRole", "ferrox", |d| {
        d["rules"][0]["verbs"] = json!([["list", "watch"]]);
    });
    for v in SUPPORTED {
        rejects(v, &doc, ".rules[0].verbs[0]", "invalid type: sequence");
    }
    // A number out of int32's range.
    let doc = mutated("ferrox.yaml", "DaemonSet", "ferrox", |d| {
        pod_spec(d)["containers"][0]["ports"][1]["containerPort"] = 4_294_967_296_u64.into();
    });
    for v in SUPPORTED {
        rejects(
            v,
            &doc,
            ".spec.template.spec.containers[0].ports[1].containerPort",
            "expected i32",
        );
    }
}

#[test]
fn a_field_newer_than_the_lowest_version_fails_there_only() {
    // PodSpec.hostnameOverride appeared in 1.34: the highest version decodes it, the lowest
    // does not know it: the same kind of failure as appArmorProfile before 1.30.
    let doc = mutated("ferrox.yaml", "DaemonSet", "ferrox", |d| {
        pod_spec(d)["hostnameOverride"] = "node".into();
    });
    HIGHEST.check(&doc).unwrap();
    rejects(
        &LOWEST,
        &doc,
        ".spec.template.spec.hostnameOverride",
        "unknown field",
    );
}

#[test]
fn a_kind_or_api_version_the_cluster_does_not_serve_fails() {
    let doc = mutated("ferrox.yaml", "ClusterRole", "ferrox", |d| {
        d["apiVersion"] = "rbac.authorization.k8s.io/v1beta1".into();
    });
    for v in SUPPORTED {
        rejects(
            v,
            &doc,
            ".",
            "\"rbac.authorization.k8s.io/v1beta1\", kind \"ClusterRole\"",
        );
    }
    let doc = mutated("ferrox.yaml", "DaemonSet", "ferrox", |d| {
        d["kind"] = "Daemonset".into();
    });
    for v in SUPPORTED {
        rejects(v, &doc, ".", "kind \"Daemonset\"");
    }
}

#[test]
fn a_crd_the_api_server_would_reject_fails_with_its_path() {
    fn crd(change: impl FnOnce(&mut Value)) -> Value {
        mutated(
            "ferrox.yaml",
            "CustomResourceDefinition",
            "bgppeers.bgp.ferrox.io",
            change,
        )
    }
    fn schema(crd: &mut Value) -> &mut Value {
        &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    }
    let at = ".spec.versions[0].schema.openAPIV3Schema";
    for v in SUPPORTED {
        // Decoding: a wrong type, an unknown schema keyword.
        rejects(
            v,
            &crd(|d| d["spec"]["versions"][0]["served"] = "yes".into()),
            ".spec.versions[0].served",
            "invalid type: string \"yes\", expected a boolean",
        );
        rejects(
            v,
            &crd(|d| {
                schema(d)["properties"]["spec"]["properties"]["asn"]["minimun"] = 1.into();
            }),
            &format!("{at}.properties.spec.properties.asn.minimun"),
            "unknown field",
        );
        // Structural: a field without a type.
        rejects(
            v,
            &crd(|d| {
                schema(d)["properties"]["spec"]["properties"]["address"]
                    .as_object_mut()
                    .unwrap()
                    .remove("type");
            }),
            &format!("{at}.properties[spec].properties[address].type"),
            "must not be empty",
        );
        // Structural: an array without items.
        rejects(
            v,
            &crd(|d| {
                schema(d)["properties"]["spec"]["properties"]["nodes"]
                    .as_object_mut()
                    .unwrap()
                    .remove("items");
            }),
            &format!("{at}.properties[spec].properties[nodes].items"),
            "must be specified",
        );
        // Structural: a junctor that sets a type, and restricts a field not specified outside.
        let doc = crd(|d| {
            schema(d)["properties"]["spec"]["anyOf"] = json!([
                { "required": ["asn"] },
                { "type": "object", "properties": { "peerAsn": { "minimum": 1 } } }
            ]);
        });
        rejects(
            v,
            &doc,
            &format!("{at}.properties[spec].anyOf[1].type"),
            "must not be set inside",
        );
        rejects(
            v,
            &doc,
            &format!("{at}.properties[spec].anyOf[1].properties[peerAsn]"),
            "outside the logical junctors",
        );
        // CRD validation: keywords CRDs forbid, a default of the wrong type, metadata.
        let doc = crd(|d| {
            let nodes = &mut schema(d)["properties"]["spec"]["properties"]["nodes"];
            nodes["uniqueItems"] = true.into();
            nodes["items"]["$ref"] = "#/definitions/node".into();
            schema(d)["properties"]["spec"]["additionalProperties"] = json!({ "type": "string" });
        });
        rejects(
            v,
            &doc,
            &format!("{at}.properties[spec].properties[nodes].uniqueItems"),
            "cannot be set to true",
        );
        rejects(
            v,
            &doc,
            &format!("{at}.properties[spec].properties[nodes].items.$ref"),
            "Forbidden",
        );
        rejects(
            v,
            &doc,
            &format!("{at}.properties[spec].additionalProperties"),
            "mutually exclusive",
        );
        rejects(
            v,
            &crd(|d| {
                schema(d)["properties"]["spec"]["properties"]["holdTime"]["default"] = "90".into()
            }),
            &format!("{at}.properties[spec].properties[holdTime].default"),
            "is not of type integer",
        );
        rejects(
            v,
            &crd(|d| {
                schema(d)["properties"]["metadata"] =
                    json!({ "type": "object", "properties": { "labels": { "type": "object" } } });
            }),
            &format!("{at}.properties[metadata]"),
            "other than name and generateName",
        );
        rejects(
            v,
            &crd(|d| d["metadata"]["name"] = "bgppeers.ferrox.io".into()),
            ".metadata.name",
            "\"bgppeers.bgp.ferrox.io\"",
        );
        rejects(
            v,
            &crd(|d| {
                d["spec"]["versions"][0]["additionalPrinterColumns"][1]["type"] = "int".into()
            }),
            ".spec.versions[0].additionalPrinterColumns[1].type",
            "must be one of",
        );
    }
    // A printer column naming no field of the schema.
    let doc = crd(|d| {
        d["spec"]["versions"][0]["additionalPrinterColumns"][1]["jsonPath"] = ".spec.as".into()
    });
    let problems = structural::printer_columns_without_field(&doc);
    assert_eq!(
        problems,
        vec![Problem::new(
            ".spec.versions[0].additionalPrinterColumns[1].jsonPath",
            ".spec.as is no field of the version's schema"
        )]
    );
    // The real schemas pass the same checks (the assertions above are not vacuous).
    for name in ["bgppeers.bgp.ferrox.io", "ipamblocks.ipam.ferrox.io"] {
        let doc = mutated("ferrox.yaml", "CustomResourceDefinition", name, |_| {});
        assert_eq!(structural::check_crd(&doc), vec![], "{name}");
    }
}

#[test]
fn a_scalar_kubectl_reads_otherwise_fails_with_its_line() {
    // `off` unquoted: a string to serde_yaml, the boolean false to kubectl, which the API server
    // then rejects in a ConfigMap.
    let text = std::fs::read_to_string(manifests::dir().join("ferrox.yaml")).unwrap();
    assert!(text.contains("FERROX_XDP: \"off\""));
    let line = text
        .lines()
        .position(|l| l.contains("FERROX_XDP: \"off\""))
        .unwrap()
        + 1;
    let unquoted = text.replace("FERROX_XDP: \"off\"", "FERROX_XDP: off");
    let found = yaml::yaml11_divergences(&unquoted);
    assert_eq!(
        found,
        vec![(line, "off".to_owned(), "the boolean false".to_owned())],
        "{found:?}"
    );
    let as_kubectl_sends = mutated("ferrox.yaml", "ConfigMap", "ferrox-config", |d| {
        d["data"]["FERROX_XDP"] = false.into();
    });
    for v in SUPPORTED {
        rejects(
            v,
            &as_kubectl_sends,
            ".data.FERROX_XDP",
            "invalid type: boolean `false`",
        );
    }
}
