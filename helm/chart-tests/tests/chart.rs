//! The chart renders (Helm's own Go library through PyPI's helm-python-sdk;
//! no helm binary exists here) with default values and with a
//! production-like values file; `helm lint --strict` finds no error; every
//! manifest validates against the Kubernetes 1.30 schemas in strict mode
//! (kubernetes-validate, offline); and the configuration file the chart
//! writes is accepted by every service's configuration types.
//!
//! The Python tools are installed once into a virtualenv under the target
//! directory (PyPI must be reachable the first time).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv() -> PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chart-venv");
    let py = dir.join("bin/python");
    let ready = dir.join(".ready");
    // The marker holds the directory the tools were installed in: their
    // scripts name their interpreter by absolute path, so a target
    // directory that moved needs them installed again.
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(dir.to_string_lossy().as_ref()) {
        let _ = std::fs::remove_dir_all(&dir);
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&dir).status().expect("python3 runs");
        assert!(ok.success(), "python3 -m venv failed");
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0", "PyYAML==6.0.2"])
            .status()
            .expect("pip runs");
        assert!(ok.success(), "installing helm-python-sdk and kubernetes-validate from PyPI failed");
        std::fs::write(&ready, dir.to_string_lossy().as_bytes()).unwrap();
    }
    dir
}

fn render(values: Option<&Path>, out: &Path) {
    let v = venv();
    let mut cmd = Command::new(v.join("bin/python"));
    cmd.arg(root().join("helm/cepheid/ci/render.py")).arg(root().join("helm/cepheid")).arg(out);
    if let Some(values) = values {
        cmd.arg(values);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "rendering failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn validate(dir: &Path) -> String {
    let v = venv();
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 5, "rendered {files:?}");
    let o = Command::new(v.join("bin/kubernetes-validate")).args(["--strict", "-k", "1.30.0"]).args(&files).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && !text.contains("ERROR"), "kubernetes-validate --strict: {text}");
    text
}

/// All documents of the rendered files.
fn documents(dir: &Path) -> Vec<serde_yaml::Value> {
    let mut docs = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
                if !v.is_null() {
                    docs.push(v);
                }
            }
        }
    }
    docs
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Services {
    engine: cepheid_engine::engine::EngineConfig,
    redis: cepheid_runtime::RedisSettings,
    kafka: cepheid_runtime::KafkaSettings,
    ingest: cepheid_ingest::IngestConfig,
    router: cepheid_keygen_router::RouterConfig,
    shard: cepheid_matcher_shard::ShardConfig,
    notifier_service: cepheid_notifier::ServiceConfig,
    notifier: cepheid_notify::NotifierConfig,
    telemetry: cepheid_telemetry::TelemetrySettings,
}

/// The configuration file of the ConfigMap, loaded as the services load theirs.
fn services_config(docs: &[serde_yaml::Value], tmp: &Path) -> Services {
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("a ConfigMap");
    let text = cm["data"]["cepheid.json"].as_str().expect("cepheid.json");
    let file = tmp.join("cepheid.json");
    std::fs::write(&file, text).unwrap();
    cepheid_runtime::load::<Services>(Some(&file)).unwrap_or_else(|e| panic!("the chart's configuration is refused: {e:#}\n{text}"))
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    let mut k: Vec<String> = docs.iter().map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap())).collect();
    k.sort();
    k
}

#[test]
fn chart_renders_and_validates_with_default_values() {
    let tmp = tempdir("default");
    render(None, &tmp);
    validate(&tmp);
    let docs = documents(&tmp);
    assert_eq!(
        kinds(&docs),
        [
            "ConfigMap/cep-cepheid-config",
            "Deployment/cep-cepheid-ingest",
            "Deployment/cep-cepheid-notifier",
            "Deployment/cep-cepheid-router",
            "PodDisruptionBudget/cep-cepheid-shard",
            "Service/cep-cepheid-ingest",
            "Service/cep-cepheid-notifier",
            "Service/cep-cepheid-router",
            "Service/cep-cepheid-shard",
            "StatefulSet/cep-cepheid-shard",
        ]
    );
    let cfg = services_config(&docs, &tmp);
    assert_eq!(cfg.shard.keyed_partitions, cfg.router.keyed_partitions, "router and shards agree on the keyed topic");
    assert_eq!(cfg.ingest.events_partitions, cfg.router.events_partitions, "whichever creates the events topic, it has the same partitions");
    assert_eq!(cfg.shard.listen, "0.0.0.0:9103");
    assert_eq!(cfg.shard.max_running_keys, 150_000, "the chart bounds a shard's running keys (its memory limit)");
    assert_eq!(cfg.telemetry.log_format, cepheid_telemetry::LogFormat::Json);
    assert!(cepheid_telemetry::Telemetry::new("check", &cfg.telemetry).is_ok(), "the chart's telemetry settings are accepted");
    // Every container is probed on real endpoints and runs as non-root.
    for d in docs.iter().filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet") {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], serde_yaml::Value::Bool(true));
        for c in pod["containers"].as_sequence().unwrap() {
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
            assert!(c["resources"]["limits"]["memory"].is_string());
        }
    }
    let notes = std::fs::read_to_string(tmp.join("NOTES.txt")).unwrap();
    assert!(notes.contains("svc/cep-cepheid-ingest"), "{notes}");
}

#[test]
fn chart_renders_and_validates_with_production_values() {
    let tmp = tempdir("prod");
    render(Some(&root().join("helm/cepheid/ci/production-values.yaml")), &tmp);
    validate(&tmp);
    let docs = documents(&tmp);
    let k = kinds(&docs);
    for want in ["HorizontalPodAutoscaler/cep-cepheid-ingest", "HorizontalPodAutoscaler/cep-cepheid-shard", "Secret/cep-cepheid-notifier"] {
        assert!(k.contains(&want.to_string()), "{want} missing from {k:?}");
    }
    let cfg = services_config(&docs, &tmp);
    assert_eq!(cfg.kafka.properties["security.protocol"], "SASL_SSL");
    assert_eq!(cfg.router.keyed_partitions, 64);
    assert!(cfg.ingest.schemas.contains_key("clickstream"));
    assert_eq!(cfg.telemetry.otlp_endpoint.as_deref(), Some("http://otel-collector.observability:4318"));
    assert_eq!(cfg.telemetry.sample_ratio, 0.01);
    let text = serde_yaml::to_string(&docs).unwrap();
    // Secrets come from Secrets, never from the ConfigMap.
    assert!(text.contains("CEPHEID__KAFKA__SASL_PASSWORD") && text.contains("CEPHEID__REDIS__URL"));
    assert!(text.contains("CEPHEID__NOTIFIER__TARGETS__"));
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert!(!serde_yaml::to_string(cm).unwrap().contains("not-a-real-secret"));
    let shard = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    assert!(shard["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"].is_sequence());
}

fn tempdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
