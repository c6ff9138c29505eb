//! Waiting for a batch to end, with progress on stderr.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::client::{Client, ClientError};
use crate::openai::{Batch, BatchStatus};

/// How often a wait asks for the batch: one small GET a second is nothing for the gateway, and
/// a finished batch is noticed within a second.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Transient failures in a row (the gateway restarting, a proxy's 502) tolerated before a wait
/// gives up. The pause grows by `POLL_INTERVAL` each time, so this rides out about a minute.
const MAX_TRANSIENT_FAILURES: u32 = 10;

/// Without a terminal (a CI log, a file), a line whenever the status changes, and otherwise at
/// most this often while the counts move: a record of progress without flooding the log.
const PLAIN_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How often the spinner moves, so a long wait visibly lives between polls.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// Polls the batch until it reaches a terminal status (completed, failed, expired, cancelled):
/// its last state, parsed and as sent.
pub async fn until_done(client: &Client, id: &str) -> Result<(Batch, Value), ClientError> {
    let mut progress = Progress::new(id);
    let mut failures = 0;
    loop {
        match client.batch(id).await {
            Ok((batch, json)) => {
                failures = 0;
                progress.update(&batch);
                if batch.status.is_terminal() {
                    progress.finish();
                    return Ok((batch, json));
                }
            }
            Err(err) if err.is_transient() && failures < MAX_TRANSIENT_FAILURES => {
                failures += 1;
                progress.note(&format!(
                    "{err}; trying again ({failures}/{MAX_TRANSIENT_FAILURES})"
                ));
            }
            Err(err) => {
                progress.finish();
                return Err(err);
            }
        }
        tokio::time::sleep(POLL_INTERVAL * failures.max(1)).await;
    }
}

/// A progress bar on a terminal; occasional plain lines otherwise.
struct Progress {
    id: String,
    bar: ProgressBar,
    /// The bar has a length (the batch has been counted); before, a spinner.
    counted: bool,
    /// For plain lines: what was last reported, and when.
    last_report: Option<(BatchStatus, u64, Instant)>,
}

impl Progress {
    fn new(id: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_prefix(id.to_owned());
        if !bar.is_hidden() {
            bar.set_style(style("{spinner} {prefix} {msg} {elapsed}"));
            bar.enable_steady_tick(SPINNER_TICK);
        }
        Progress {
            id: id.to_owned(),
            bar,
            counted: false,
            last_report: None,
        }
    }

    fn update(&mut self, batch: &Batch) {
        let counts = batch.counts();
        let done = counts.done();
        if self.bar.is_hidden() {
            let due = match &self.last_report {
                None => true,
                Some((status, last_done, at)) => {
                    *status != batch.status
                        || (*last_done != done && at.elapsed() >= PLAIN_REPORT_EVERY)
                }
            };
            if due {
                eprintln!(
                    "{}: {} {done}/{} done ({} failed)",
                    self.id, batch.status, counts.total, counts.failed
                );
                self.last_report = Some((batch.status.clone(), done, Instant::now()));
            }
            return;
        }
        if counts.total > 0 {
            if !self.counted {
                self.bar.set_style(style(
                    "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} {elapsed}",
                ));
                self.counted = true;
            }
            self.bar.set_length(counts.total);
            self.bar.set_position(done);
        }
        let message = match counts.failed {
            0 => batch.status.to_string(),
            failed => format!("{} ({failed} failed)", batch.status),
        };
        self.bar.set_message(message);
    }

    fn note(&self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{}: {text}", self.id);
        } else {
            self.bar.println(text);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}
