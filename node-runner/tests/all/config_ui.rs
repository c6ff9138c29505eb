//! Golden tests for bad configuration: each file in `tests/ui/invalid/` must be refused with the
//! message in the `.err` file beside it. Set `BLESS=1` to write the messages after a deliberate
//! change.

use std::path::Path;

use garage_node_runner::config::NodeConfig;

#[test]
fn invalid_configs_are_refused_with_a_clear_message() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/invalid");
    let bless = std::env::var_os("BLESS").is_some();
    let mut configs: Vec<_> = std::fs::read_dir(&dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    configs.retain(|path| path.extension().is_some_and(|e| e == "toml"));
    configs.sort();
    for path in &configs {
        let text = std::fs::read_to_string(path)?;
        let error = match NodeConfig::load(&text, std::iter::empty()) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(error) => error.to_string(),
        };
        let expected_path = path.with_extension("err");
        if bless {
            std::fs::write(&expected_path, format!("{error}\n"))?;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!("{} is missing (run with BLESS=1)", expected_path.display())
        });
        assert_eq!(error.trim_end(), expected.trim_end(), "{}", path.display());
    }
    assert!(
        configs.len() >= 10,
        "only {} invalid configs",
        configs.len()
    );
    Ok(())
}

#[test]
fn a_missing_file_names_its_path() {
    let error = NodeConfig::load_file("/nonexistent/node-runner.toml", std::iter::empty())
        .err()
        .map(|e| e.to_string());
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.starts_with("cannot read config file /nonexistent/node-runner.toml")),
        "{error:?}"
    );
}
