//! The `garage` command line (the real binary) against a real gateway with rigs pulling the
//! batch work.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};

async fn garage(base: &str, key: &str, dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(workspace_binary("garage"))
        .args(args)
        .current_dir(dir)
        .env("GARAGE_URL", format!("{base}/v1"))
        .env("GARAGE_API_KEY", key)
        .env_remove("OPENAI_API_KEY")
        .output()
        .await
        .expect("garage runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn report(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn garage_jobs_submit_wait_list_results_and_cancel() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let token = enrollment_token(&base, 2).await;
    // Lines of 5 tokens at 50 tokens/s: 0.1 s each, 8 at a time over the two rigs.
    let mut rigs = Vec::new();
    for i in 0..2 {
        rigs.push(sim_rig(rig_options(&base, &format!("cli-rig-{i}"), &token), 50.0).await);
    }
    wait_until(Duration::from_secs(20), "rigs routable", || async {
        routable_rigs(&base).await == 2
    })
    .await;
    let (_, key) = create_key(&base, json!({"name": "cli"})).await;
    let dir = tempfile::tempdir().unwrap();

    // Plain prompts, a JSON string prompt and a full request line, in one file.
    let prompts = [
        "Why is the sky blue?".to_owned(),
        "\"Write a haiku\\nabout GPUs\"".to_owned(),
        json!({"custom_id": "q-3", "body": {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 3}}).to_string(),
    ]
    .join("\n");
    std::fs::write(dir.path().join("prompts.txt"), prompts).unwrap();
    let submitted = garage(
        &base,
        &key,
        dir.path(),
        &[
            "job",
            "submit",
            "--model",
            MODEL,
            "--input",
            "prompts.txt",
            "--max-tokens",
            "5",
            "--metadata",
            "team=ml",
            "--wait",
            "-o",
            "answers.jsonl",
        ],
    )
    .await;
    assert!(submitted.status.success(), "{}", report(&submitted));
    let id = stdout(&submitted).trim().to_owned();
    assert!(id.starts_with("batch_"), "{}", report(&submitted));
    let answers: Vec<Value> = std::fs::read_to_string(dir.path().join("answers.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = answers
        .iter()
        .map(|a| a["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["line-1", "line-2", "q-3"]);
    assert!(answers.iter().all(|a| a["response"]["status_code"] == 200));

    let status = garage(&base, &key, dir.path(), &["job", "status", &id, "--json"]).await;
    assert!(status.status.success(), "{}", report(&status));
    let batch: Value = serde_json::from_str(&stdout(&status)).expect("status --json is JSON");
    assert_eq!(batch["status"], "completed");
    assert_eq!(batch["metadata"]["team"], "ml");

    let results = garage(&base, &key, dir.path(), &["job", "results", &id]).await;
    assert!(results.status.success(), "{}", report(&results));
    assert_eq!(stdout(&results).lines().count(), 3);

    let listed = garage(&base, &key, dir.path(), &["job", "list"]).await;
    assert!(listed.status.success(), "{}", report(&listed));
    assert!(stdout(&listed).contains(&id) && stdout(&listed).contains("completed"));

    // A long job, cancelled: `status --wait` then reports it as unsuccessful (exit 3).
    let many: String = (0..200).map(|i| format!("prompt {i}\n")).collect();
    std::fs::write(dir.path().join("many.txt"), many).unwrap();
    let submitted = garage(
        &base,
        &key,
        dir.path(),
        &[
            "job",
            "submit",
            "--model",
            MODEL,
            "--input",
            "many.txt",
            "--max-tokens",
            "5",
        ],
    )
    .await;
    assert!(submitted.status.success(), "{}", report(&submitted));
    let long = stdout(&submitted).trim().to_owned();
    let cancelled = garage(&base, &key, dir.path(), &["job", "cancel", &long]).await;
    assert!(cancelled.status.success(), "{}", report(&cancelled));
    assert!(
        stdout(&cancelled).contains("cancel"),
        "{}",
        report(&cancelled)
    );
    let waited = garage(&base, &key, dir.path(), &["job", "status", &long, "--wait"]).await;
    assert_eq!(waited.status.code(), Some(3), "{}", report(&waited));
    assert!(stdout(&waited).contains("cancelled"), "{}", report(&waited));

    // A wrong key is a clear error, not a crash.
    let refused = garage(&base, "sk-wrong", dir.path(), &["job", "list"]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", report(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        report(&refused)
    );
}
