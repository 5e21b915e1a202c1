//! deploy/kubernetes/: every manifest validates against the Kubernetes OpenAPI schemas
//! (PyPI kubernetes-validate, strict), the ConfigMap holds a config kdedup accepts, and the
//! Deployment keeps the promises operators rely on (grace above the drain bound, probes on
//! /healthz and /readyz, non-root, read-only root filesystem, secrets from files).
//! Needs KDEDUP_TEST_KUBE_VALIDATE and KDEDUP_TEST_PYTHON (scripts/services installs both).

use std::path::Path;
use std::process::Command;

use kdedup::config::Config;

const DIR: &str = "deploy/kubernetes";

struct Tools {
    validate: String,
    python: String,
}

fn tools() -> Option<Tools> {
    match (std::env::var("KDEDUP_TEST_KUBE_VALIDATE"), std::env::var("KDEDUP_TEST_PYTHON")) {
        (Ok(validate), Ok(python)) => Some(Tools { validate, python }),
        _ => {
            eprintln!("skipped: KDEDUP_TEST_KUBE_VALIDATE and KDEDUP_TEST_PYTHON are not set (scripts/services env)");
            None
        }
    }
}

fn manifests() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

/// A manifest as JSON (through PyYAML, which kubernetes-validate brings).
fn load(tools: &Tools, file: &str) -> serde_json::Value {
    let out = Command::new(&tools.python)
        .args(["-c", "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))", file])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let Some(tools) = tools() else { return };
    let files = manifests();
    for kind in ["configmap.yaml", "deployment.yaml", "pdb.yaml", "secret.yaml", "service.yaml"] {
        assert!(files.iter().any(|f| f.ends_with(kind)), "{DIR} lacks {kind}");
    }
    let out = Command::new(&tools.validate).arg("--strict").args(&files).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for f in &files {
        assert!(text.lines().any(|l| l.contains(f.as_str()) && l.contains("passed")), "{f} not validated:\n{text}");
    }

    // The validator is not vacuous: a field of the wrong type in our Deployment fails it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("deployment.yaml");
    let text = std::fs::read_to_string(format!("{DIR}/deployment.yaml")).unwrap();
    std::fs::write(&broken, text.replace("terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: soon"))
        .unwrap();
    let out = Command::new(&tools.validate).arg("--strict").arg(&broken).output().unwrap();
    assert!(!out.status.success(), "a broken Deployment passed validation");
}

#[test]
fn the_deployment_drains_within_its_grace_and_runs_locked_down_on_a_config_kdedup_accepts() {
    let Some(tools) = tools() else { return };
    let configmap = load(&tools, &format!("{DIR}/configmap.yaml"));
    let toml = configmap["data"]["kdedup.toml"].as_str().unwrap();

    // The config, with the Secret's own files where the pod mounts them: every file the
    // ConfigMap names is in the Secret, with a value.
    let secret = load(&tools, &format!("{DIR}/secret.yaml"));
    let files = secret["stringData"].as_object().unwrap();
    for line in toml.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if let Some((_, rest)) = line.split_once("/run/secrets/kdedup/") {
            let name = rest.trim_end_matches('"');
            let value = files.get(name).and_then(|v| v.as_str());
            assert!(value.is_some_and(|v| !v.is_empty()), "the ConfigMap reads {name}; the Secret has {value:?}");
        }
    }
    let secrets = tempfile::tempdir().unwrap();
    for (name, value) in files {
        std::fs::write(secrets.path().join(name), value.as_str().unwrap()).unwrap();
    }
    let local = toml.replace("/run/secrets/kdedup", &secrets.path().display().to_string());
    let config = Config::from_toml_with_env(&local, "configmap.yaml", std::iter::empty()).unwrap();
    assert_eq!(config.kafka.client.get("sasl.password").map(String::as_str), Some("REPLACE-ME"));
    // The clients librdkafka would build from it (a CA file it cannot load fails here).
    let clients = kdedup::kafka_client::KafkaClients::from(&config.kafka);
    let _: rdkafka::consumer::BaseConsumer =
        clients.group_consumer(&config.kafka.group_id, None).create().expect("the consumer librdkafka builds");
    let _: rdkafka::producer::BaseProducer = clients.producer().create().expect("the producer librdkafka builds");
    let metrics = config.metrics_listen.expect("the probes need the endpoint");

    let deployment = load(&tools, &format!("{DIR}/deployment.yaml"));
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace * 1000 > config.pipeline.drain_timeout.as_millis() as u64 + 10_000,
        "grace {grace} s must exceed the drain bound {:?} plus a commit and leaving the group",
        config.pipeline.drain_timeout
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let secret_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "secrets").unwrap();
    assert_eq!(secret_volume["secret"]["secretName"], "kdedup");

    let all: Vec<&serde_json::Value> =
        pod["initContainers"].as_array().unwrap().iter().chain(pod["containers"].as_array().unwrap()).collect();
    for c in &all {
        let name = c["name"].as_str().unwrap();
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{name}");
        let mounts = c["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["mountPath"] == "/run/secrets/kdedup"), "{name} lacks the secrets");
        assert!(
            c.get("env")
                .and_then(|e| e.as_array())
                .is_none_or(|env| !env.iter().any(|e| e["name"].as_str().unwrap().contains("PASSWORD"))),
            "{name}: secrets come from files"
        );
    }
    let main = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "kdedup").unwrap();
    assert_eq!(main["ports"][0]["containerPort"].as_u64(), Some(u64::from(metrics.port())));
    assert_eq!(main["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(main["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(main["resources"]["requests"]["memory"].is_string() && main["resources"]["limits"]["memory"].is_string());
    let check = all.iter().find(|c| c["name"] == "check").expect("an init container runs `kdedup check`");
    assert_eq!(check["args"][0], "check");

    let pdb = load(&tools, &format!("{DIR}/pdb.yaml"));
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    let service = load(&tools, &format!("{DIR}/service.yaml"));
    assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
    assert!(Path::new(&format!("{DIR}/secret.yaml")).exists());
}

#[test]
fn the_service_monitor_scrapes_the_services_metrics_port() {
    let Some(tools) = tools() else { return };
    let monitor = load(&tools, &format!("{DIR}/prometheus-operator/servicemonitor.yaml"));
    let service = load(&tools, &format!("{DIR}/service.yaml"));
    assert_eq!(monitor["kind"], "ServiceMonitor");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"], "it selects the Service");
    let port = &monitor["spec"]["endpoints"][0]["port"];
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| &p["name"] == port), "the Service has a port named {port}");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}
