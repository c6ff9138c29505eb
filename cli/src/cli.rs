//! The `garage` command line.
//!
//! What a script wants goes to stdout (a batch id, a status, a table, result lines); what a
//! person wants (what happened, progress, hints) goes to stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::{Client, GatewayUrl};
use crate::input::{Endpoint, RequestDefaults, to_batch_jsonl};
use crate::openai::{Batch, BatchStatus};
use crate::{render, wait};

/// The batch ended failed, expired or cancelled.
pub const EXIT_BATCH_UNSUCCESSFUL: u8 = 3;
/// `job results` on a batch that is still running.
pub const EXIT_NOT_FINISHED: u8 = 4;

const EXIT_CODES: &str = "\
Exit status: 0 done; 1 an error (the message says which); 2 a bad command line;
3 the batch ended failed, expired or cancelled; 4 the batch has not finished yet.";

#[derive(Debug, Parser)]
#[command(
    name = "garage",
    version,
    about = "Garage command line: batch jobs on a Garage gateway (OpenAI's Batch API), and policy plugins from idea to live",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// The gateway's base URL; a trailing `/v1` is fine.
    #[arg(
        long,
        env = "GARAGE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true,
        help_heading = "Gateway"
    )]
    url: GatewayUrl,
    /// API key, sent as `Authorization: Bearer`. Falls back to OPENAI_API_KEY.
    #[arg(
        long,
        env = "GARAGE_API_KEY",
        hide_env_values = true,
        global = true,
        help_heading = "Gateway"
    )]
    api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Batch jobs: submit a file of prompts, follow it, fetch the results.
    #[command(subcommand)]
    Job(JobCommand),
    /// Policy plugins: write one (Rust, Python, JavaScript), test it, build it, replay it,
    /// push it to a gateway as a canary, promote or roll back.
    #[command(subcommand)]
    Plugin(crate::plugin::PluginCommand),
}

#[derive(Debug, Subcommand)]
#[command(after_help = EXIT_CODES)]
enum JobCommand {
    /// Upload prompts or requests and start a batch; prints the batch id.
    Submit(SubmitArgs),
    /// Show a batch's status and request counts.
    Status {
        /// Batch id.
        id: String,
        /// Wait until the batch completes, fails, expires or is cancelled, showing progress.
        #[arg(long)]
        wait: bool,
        /// Print the Batch object as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a finished batch's results (or, with --errors, its failed requests).
    Results {
        /// Batch id.
        id: String,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// The error file: one line per failed request.
        #[arg(long)]
        errors: bool,
    },
    /// List batches, newest first.
    List {
        /// How many to show (with --all: how many per request to the gateway).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
        limit: u32,
        /// Every batch, following the pages to the end.
        #[arg(long)]
        all: bool,
    },
    /// Cancel a batch; prints its new status.
    Cancel {
        /// Batch id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// Model for prompt lines, and for request lines whose body names none.
    #[arg(long)]
    model: String,
    /// One request per line: a prompt (plain text or a JSON string), or a full batch request
    /// line (a JSON object with `custom_id`). Blank lines are skipped; `-` reads stdin.
    #[arg(long, short)]
    input: PathBuf,
    /// The API every request goes to.
    #[arg(long, default_value = "/v1/chat/completions")]
    endpoint: Endpoint,
    /// `max_tokens` for prompt lines (request lines keep their own).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Metadata for the batch; repeat for more.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// Wait for the batch to end, then write its results (stdout, or --output). Without
    /// --output, stdout carries only the results and the batch id goes to stderr.
    #[arg(long)]
    wait: bool,
    /// With --wait: write the results to this file.
    #[arg(long, short, requires = "wait")]
    output: Option<PathBuf>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// `--api-key` (or `GARAGE_API_KEY`, which clap has already read), else `OPENAI_API_KEY`.
fn resolve_api_key(
    flag: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    flag.filter(|key| !key.is_empty())
        .or_else(|| env("OPENAI_API_KEY").filter(|key| !key.is_empty()))
        .context("no API key: pass --api-key, or set GARAGE_API_KEY (or OPENAI_API_KEY)")
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let job = match cli.command {
        Command::Job(job) => job,
        Command::Plugin(command) => return crate::plugin::run(cli.gateway.url, command).await,
    };
    let api_key = resolve_api_key(cli.gateway.api_key, |name| std::env::var(name).ok())?;
    let client = Client::new(cli.gateway.url, api_key)?;
    match job {
        JobCommand::Submit(args) => submit(&client, args).await,
        JobCommand::Status { id, wait, json } => status(&client, &id, wait, json).await,
        JobCommand::Results { id, output, errors } => {
            results(&client, &id, output.as_deref(), errors).await
        }
        JobCommand::List { limit, all } => list(&client, limit, all).await,
        JobCommand::Cancel { id } => {
            let batch = client.cancel_batch(&id).await?;
            print_stdout(&format!("{} {}\n", batch.id, batch.status))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    if args.max_tokens.is_some() && args.endpoint == Endpoint::Embeddings {
        bail!("--max-tokens does not apply to {}", Endpoint::Embeddings);
    }
    let (name, text) = read_input(&args.input).await?;
    let input = to_batch_jsonl(
        &text,
        &RequestDefaults {
            endpoint: args.endpoint,
            model: args.model,
            max_tokens: args.max_tokens,
        },
    )
    .with_context(|| format!("cannot submit {name}"))?;

    let file = client
        .upload_batch_file(&name, input.jsonl.into_bytes())
        .await
        .with_context(|| format!("cannot upload {name}"))?;
    eprintln!(
        "uploaded {} from {name} as {} ({} bytes)",
        render::count(input.requests as u64, "request", "requests"),
        file.id,
        file.bytes.map_or_else(|| "?".to_owned(), |b| b.to_string())
    );

    let metadata: Map<String, Value> = args
        .metadata
        .into_iter()
        .map(|(key, value)| (key, Value::String(value)))
        .collect();
    let batch = client
        .create_batch(&file.id, args.endpoint, &metadata)
        .await
        .context("cannot create the batch")?;
    eprintln!("created batch {} ({})", batch.id, batch.status);

    if !args.wait {
        print_stdout(&format!("{}\n", batch.id))?;
        return Ok(ExitCode::SUCCESS);
    }
    // Results on stdout must stay pure JSONL.
    if args.output.is_some() {
        print_stdout(&format!("{}\n", batch.id))?;
    }
    let (batch, _) = wait::until_done(client, &batch.id).await?;
    eprintln!("{}", one_line(&batch));
    // Expired and cancelled batches may still have the results of what finished in time.
    if batch.status.is_unsuccessful() && batch.output_file_id.is_none() {
        eprint!("{}", render::validation_errors(&batch));
        return Ok(ExitCode::from(EXIT_BATCH_UNSUCCESSFUL));
    }
    write_results(client, &batch, args.output.as_deref(), false).await?;
    Ok(if batch.status.is_unsuccessful() {
        ExitCode::from(EXIT_BATCH_UNSUCCESSFUL)
    } else {
        ExitCode::SUCCESS
    })
}

/// The input's name (for the upload) and its text.
async fn read_input(path: &Path) -> anyhow::Result<(String, String)> {
    let (name, bytes) = if path == Path::new("-") {
        let mut bytes = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut bytes)
            .await
            .context("cannot read stdin")?;
        ("stdin.jsonl".to_owned(), bytes)
    } else {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        let name = path
            .file_name()
            .map_or_else(|| "input.jsonl".into(), |n| n.to_string_lossy());
        (name.into_owned(), bytes)
    };
    let text = String::from_utf8(bytes)
        .map_err(|err| anyhow::anyhow!("{name} is not UTF-8 text ({err})"))?;
    Ok((name, text))
}

async fn status(client: &Client, id: &str, wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    let (batch, raw) = if wait {
        wait::until_done(client, id).await?
    } else {
        client.batch(id).await?
    };
    if json {
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&raw)?))?;
    } else {
        print_stdout(&render::batch_summary(&batch))?;
    }
    Ok(if batch.status.is_unsuccessful() {
        ExitCode::from(EXIT_BATCH_UNSUCCESSFUL)
    } else {
        ExitCode::SUCCESS
    })
}

async fn results(
    client: &Client,
    id: &str,
    output: Option<&Path>,
    errors: bool,
) -> anyhow::Result<ExitCode> {
    let (batch, _) = client.batch(id).await?;
    if !batch.status.is_terminal() {
        let counts = batch.counts();
        eprintln!(
            "batch {id} has not finished: {} ({}/{} done); `garage job status {id} --wait` waits for it",
            batch.status,
            counts.done(),
            counts.total
        );
        return Ok(ExitCode::from(EXIT_NOT_FINISHED));
    }
    // A batch that failed validation ran nothing: its errors are the whole story.
    if batch.status == BatchStatus::Failed
        || (batch.status.is_unsuccessful() && !errors && batch.output_file_id.is_none())
    {
        eprintln!("{}: no results", one_line(&batch));
        eprint!("{}", render::validation_errors(&batch));
        return Ok(ExitCode::from(EXIT_BATCH_UNSUCCESSFUL));
    }
    if batch.status.is_unsuccessful() && !errors {
        eprintln!(
            "batch {id} was {}: these are the results of the requests that finished",
            batch.status
        );
    }
    write_results(client, &batch, output, errors).await?;
    Ok(ExitCode::SUCCESS)
}

/// Downloads the output (or error) file of an ended batch to `output`, or stdout.
async fn write_results(
    client: &Client,
    batch: &Batch,
    output: Option<&Path>,
    errors: bool,
) -> anyhow::Result<()> {
    let id = &batch.id;
    let failed = batch.counts().failed;
    let file_id = if errors {
        match &batch.error_file_id {
            Some(file_id) => file_id,
            None => {
                if failed == 0 {
                    eprintln!("batch {id} has no error file: no request failed");
                } else {
                    eprintln!("batch {id} has no error file");
                }
                if let Some(path) = output.filter(|path| *path != Path::new("-")) {
                    tokio::fs::write(path, b"")
                        .await
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                return Ok(());
            }
        }
    } else {
        match &batch.output_file_id {
            Some(file_id) => file_id,
            None if batch.error_file_id.is_some() => bail!(
                "batch {id} has no results: all its requests failed; `garage job results {id} --errors` shows why"
            ),
            None => bail!("batch {id} has no output file ({})", batch.status),
        }
    };

    match output.filter(|path| *path != Path::new("-")) {
        Some(path) => {
            let lines = download_to_file(client, file_id, path).await?;
            eprintln!(
                "wrote {} to {}",
                render::count(lines, "line", "lines"),
                path.display()
            );
        }
        None => {
            download(client, file_id, &mut tokio::io::stdout()).await?;
        }
    }
    if !errors && failed > 0 {
        eprintln!(
            "{} failed: `garage job results {id} --errors` shows why",
            render::count(failed, "request", "requests")
        );
    }
    Ok(())
}

/// Writes beside the target and renames at the end, so a broken download never leaves a file
/// that looks complete.
async fn download_to_file(client: &Client, file_id: &str, path: &Path) -> anyhow::Result<u64> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".part");
    let partial = PathBuf::from(partial);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot write {}", path.display()))?;
    let result = download(client, file_id, &mut file).await;
    drop(file);
    match result {
        Ok(lines) => {
            tokio::fs::rename(&partial, path)
                .await
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(lines)
        }
        Err(err) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(err)
        }
    }
}

/// Streams a file's content into `sink`; the number of lines. A reader that went away (`| head`)
/// ends the download quietly.
async fn download(
    client: &Client,
    file_id: &str,
    sink: &mut (impl AsyncWrite + Unpin),
) -> anyhow::Result<u64> {
    let mut content = client
        .file_content(file_id)
        .await
        .with_context(|| format!("cannot download {file_id}"))?;
    let mut lines = 0;
    while let Some(chunk) = content
        .chunk()
        .await
        .with_context(|| format!("cannot download {file_id}"))?
    {
        lines += chunk.iter().filter(|&&byte| byte == b'\n').count() as u64;
        match sink.write_all(&chunk).await {
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(lines),
            other => other.context("cannot write the results")?,
        }
    }
    match sink.flush().await {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(lines),
        other => other.map(|()| lines).context("cannot write the results"),
    }
}

async fn list(client: &Client, limit: u32, all: bool) -> anyhow::Result<ExitCode> {
    let mut batches = Vec::new();
    let mut after: Option<String> = None;
    let more = loop {
        let page = client.list_batches(limit, after.as_deref()).await?;
        batches.extend(page.data);
        if !all || !page.has_more {
            break page.has_more;
        }
        // A gateway that says "more" without a new cursor would loop forever.
        match page.last_id {
            Some(last) if after.as_ref() != Some(&last) => after = Some(last),
            _ => bail!("the gateway says there are more batches but gives no new `last_id`"),
        }
    };
    if batches.is_empty() {
        eprintln!("no batches");
    } else {
        print_stdout(&render::batch_table(&batches))?;
    }
    if more {
        eprintln!("more batches: --all shows every one");
    }
    Ok(ExitCode::SUCCESS)
}

/// `batch_abc completed: 98 completed, 2 failed, 100 total`.
fn one_line(batch: &Batch) -> String {
    format!(
        "batch {} {}: {}",
        batch.id,
        batch.status,
        render::counts_sentence(batch.counts())
    )
}

/// `print!` that does not panic when the reader has gone (`garage job list | head -1`).
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("garage").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = parse(&[
            "job",
            "list",
            "--url",
            "http://gw:9000/v1/",
            "--api-key",
            "sk-1",
        ])
        .expect("valid");
        assert_eq!(cli.gateway.url.to_string(), "http://gw:9000");
        assert_eq!(cli.gateway.api_key.as_deref(), Some("sk-1"));
    }

    #[test]
    fn a_bad_url_is_a_usage_error() {
        let err = parse(&["--url", "gw:9000", "job", "list"]).expect_err("invalid");
        assert!(err.to_string().contains("http:// or https://"), "{err}");
    }

    #[test]
    fn submit_options() {
        let cli = parse(&[
            "job",
            "submit",
            "--model",
            "m",
            "-i",
            "in.txt",
            "--endpoint",
            "/v1/embeddings",
            "--metadata",
            "team=ml",
            "--metadata",
            "run=a=b",
        ])
        .expect("valid");
        let Command::Job(JobCommand::Submit(args)) = cli.command else {
            panic!("not submit");
        };
        assert_eq!(args.endpoint, Endpoint::Embeddings);
        assert_eq!(
            args.metadata,
            [
                ("team".to_owned(), "ml".to_owned()),
                ("run".to_owned(), "a=b".to_owned())
            ]
        );
        assert!(
            parse(&[
                "job",
                "submit",
                "--model",
                "m",
                "-i",
                "x",
                "--endpoint",
                "/v1/audio/speech"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "job",
                "submit",
                "--model",
                "m",
                "-i",
                "x",
                "--metadata",
                "novalue"
            ])
            .is_err()
        );
        // --output only makes sense with --wait.
        assert!(parse(&["job", "submit", "--model", "m", "-i", "x", "-o", "out"]).is_err());
    }

    #[test]
    fn list_limit_is_bounded() {
        assert!(parse(&["job", "list", "--limit", "0"]).is_err());
        assert!(parse(&["job", "list", "--limit", "101"]).is_err());
        assert!(parse(&["job", "list", "--limit", "100", "--all"]).is_ok());
    }

    #[test]
    fn the_api_key_falls_back_to_openai_api_key() {
        let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-openai".to_owned());
        let no_env = |_: &str| None;
        assert_eq!(
            resolve_api_key(Some("sk-flag".into()), env).expect("a key"),
            "sk-flag"
        );
        assert_eq!(resolve_api_key(None, env).expect("a key"), "sk-openai");
        assert_eq!(
            resolve_api_key(Some(String::new()), env).expect("a key"),
            "sk-openai"
        );
        let err = resolve_api_key(None, no_env).expect_err("no key");
        assert!(err.to_string().contains("--api-key"), "{err}");
    }
}
