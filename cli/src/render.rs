//! What the commands print: batch summaries, the listing table, times.

use std::fmt::Write as _;

use crate::openai::{Batch, BatchError, RequestCounts};

/// `completed/failed/total`, as the listing shows it.
pub fn counts_cell(counts: RequestCounts) -> String {
    format!("{}/{}/{}", counts.completed, counts.failed, counts.total)
}

/// `98 completed, 2 failed, 100 total`.
pub fn counts_sentence(counts: RequestCounts) -> String {
    format!(
        "{} completed, {} failed, {} total",
        counts.completed, counts.failed, counts.total
    )
}

/// `1 line`, `2 lines`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A Unix time as `2024-03-26 16:45:33 UTC`.
pub fn utc(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let seconds = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date: Howard Hinnant's `civil_from_days`
/// (public domain), exact over the whole `i64`-seconds range that matters here.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Left-aligned columns two spaces apart; the header is the first row.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(column) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header = header.iter().map(|cell| (*cell).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let width = widths.get(column).copied().unwrap_or(0);
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `job list` table.
pub fn batch_table(batches: &[Batch]) -> String {
    let rows: Vec<Vec<String>> = batches
        .iter()
        .map(|batch| {
            vec![
                batch.id.clone(),
                batch.status.to_string(),
                counts_cell(batch.counts()),
                utc(batch.created_at),
                batch.model.clone().unwrap_or_else(|| "-".to_owned()),
                batch.endpoint.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATUS",
            "COMPLETED/FAILED/TOTAL",
            "CREATED",
            "MODEL",
            "ENDPOINT",
        ],
        &rows,
    )
}

/// `job status`: the state, the counts, the times that are set, the files and metadata.
pub fn batch_summary(batch: &Batch) -> String {
    let mut out = format!("{}  {}\n", batch.id, batch.status);
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "  {:<12}{value}", format!("{name}:"));
    };
    field("requests", counts_sentence(batch.counts()));
    field("endpoint", batch.endpoint.clone());
    if let Some(model) = &batch.model {
        field("model", model.clone());
    }
    field("input", batch.input_file_id.clone());
    if let Some(output) = &batch.output_file_id {
        field("output", output.clone());
    }
    if let Some(errors) = &batch.error_file_id {
        field("errors", errors.clone());
    }
    field("created", utc(batch.created_at));
    for (name, time) in [
        ("started", batch.in_progress_at),
        ("finalizing", batch.finalizing_at),
        ("completed", batch.completed_at),
        ("failed", batch.failed_at),
        ("cancelling", batch.cancelling_at),
        ("cancelled", batch.cancelled_at),
        ("expired", batch.expired_at),
    ] {
        if let Some(time) = time {
            field(name, utc(time));
        }
    }
    if !batch.status.is_terminal()
        && let Some(expires) = batch.expires_at
    {
        field("expires", utc(expires));
    }
    if let Some(metadata) = batch.metadata.as_ref().filter(|m| !m.is_empty()) {
        let pairs: Vec<String> = metadata
            .iter()
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => format!("{key}={text}"),
                other => format!("{key}={other}"),
            })
            .collect();
        field("metadata", pairs.join(" "));
    }
    out.push_str(&validation_errors(batch));
    out
}

/// Why a batch failed validation, one line per problem; empty when there is none.
pub fn validation_errors(batch: &Batch) -> String {
    let errors = batch
        .errors
        .as_ref()
        .map(|errors| errors.data.as_slice())
        .unwrap_or_default();
    let mut out = String::new();
    if errors.is_empty() {
        return out;
    }
    out.push_str("  validation errors:\n");
    for error in errors {
        let _ = writeln!(out, "    {}", validation_error(error));
    }
    out
}

fn validation_error(error: &BatchError) -> String {
    let mut text = match error.line {
        Some(line) => format!("line {line}: "),
        None => String::new(),
    };
    text.push_str(error.message.as_deref().unwrap_or("(no message)"));
    let mut details = Vec::new();
    if let Some(code) = &error.code {
        details.push(code.clone());
    }
    if let Some(param) = &error.param {
        details.push(format!("param {param}"));
    }
    if !details.is_empty() {
        let _ = write!(text, " [{}]", details.join(", "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(json: serde_json::Value) -> Batch {
        let mut object = serde_json::json!({
            "id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": "file-in", "completion_window": "24h", "status": "in_progress",
            "created_at": 1_711_471_533,
            "request_counts": {"total": 100, "completed": 40, "failed": 2}
        });
        if let (Some(object), serde_json::Value::Object(extra)) = (object.as_object_mut(), json) {
            object.extend(extra);
        }
        serde_json::from_value(object).expect("a Batch object")
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_711_471_533), "2024-03-26 16:45:33 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(4_107_542_399), "2100-02-28 23:59:59 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn table_columns_line_up() {
        let text = table(
            &["ID", "STATUS", "N"],
            &[
                vec!["batch_long_id".into(), "ok".into(), "1".into()],
                vec!["b".into(), "in_progress".into(), "".into()],
            ],
        );
        assert_eq!(
            text,
            "ID             STATUS       N\n\
             batch_long_id  ok           1\n\
             b              in_progress\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn the_batch_table() {
        let text = batch_table(&[
            batch(serde_json::json!({})),
            batch(serde_json::json!({
                "id": "batch_22", "status": "completed", "model": "llama-3.1-8b-instruct",
                "endpoint": "/v1/embeddings", "created_at": 0,
                "request_counts": {"total": 3, "completed": 3, "failed": 0}
            })),
        ]);
        assert_eq!(
            text,
            "ID        STATUS       COMPLETED/FAILED/TOTAL  CREATED                  MODEL                  ENDPOINT\n\
             batch_1   in_progress  40/2/100                2024-03-26 16:45:33 UTC  -                      /v1/chat/completions\n\
             batch_22  completed    3/0/3                   1970-01-01 00:00:00 UTC  llama-3.1-8b-instruct  /v1/embeddings\n"
        );
    }

    #[test]
    fn a_failed_batch_shows_its_errors() {
        let text = batch_summary(&batch(serde_json::json!({
            "status": "failed", "failed_at": 1_711_471_540, "metadata": {"job": "nightly"},
            "errors": {"object": "list", "data": [
                {"code": "missing_required_parameter", "message": "Missing custom_id.",
                 "param": "custom_id", "line": 3},
                {"code": null, "message": "File is empty.", "param": null, "line": null}
            ]}
        })));
        assert_eq!(
            text,
            "batch_1  failed\n  \
             requests:   40 completed, 2 failed, 100 total\n  \
             endpoint:   /v1/chat/completions\n  \
             input:      file-in\n  \
             created:    2024-03-26 16:45:33 UTC\n  \
             failed:     2024-03-26 16:45:40 UTC\n  \
             metadata:   job=nightly\n  \
             validation errors:\n    \
             line 3: Missing custom_id. [missing_required_parameter, param custom_id]\n    \
             File is empty.\n"
        );
    }
}
