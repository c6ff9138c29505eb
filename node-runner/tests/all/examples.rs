//! The example configs in `examples/` (the ones the README shows) stay valid.

use garage_node_runner::config::{Driver, NodeConfig};

fn load(name: &str) -> NodeConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    NodeConfig::load_file(&path, std::iter::empty()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn two_gpu_docker_rig() {
    let config = load("two-gpu-docker.toml");
    assert_eq!(config.engines.len(), 2);
    assert!(
        config
            .engines
            .iter()
            .all(|e| matches!(e.driver, Driver::Docker(_)))
    );
    assert_eq!(config.engines[0].gpus, [0]);
    assert_eq!(config.engines[1].gpus, [1]);
}

#[test]
fn local_simulated_rig() {
    let config = load("local-sim.toml");
    assert!(matches!(config.engines[0].driver, Driver::Process(_)));
    assert!(config.enrollment_token.is_none());
}
