//! Golden tests for bad configuration: each file in `tests/ui/invalid/` must be refused with the
//! message in the `.err` file beside it. Set `BLESS=1` to write the messages after a deliberate
//! change.

use std::path::Path;

use garage_gateway::Config;

#[test]
fn invalid_configs_are_refused_with_a_clear_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/invalid");
    let bless = std::env::var_os("BLESS").is_some();
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        let error = match Config::load(Some(&text), std::iter::empty()) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(error) => error.to_string(),
        };
        let expected_path = path.with_extension("err");
        if bless {
            std::fs::write(&expected_path, format!("{error}\n")).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!("{} is missing (run with BLESS=1)", expected_path.display())
        });
        assert_eq!(error.trim_end(), expected.trim_end(), "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} invalid configs found");
}
