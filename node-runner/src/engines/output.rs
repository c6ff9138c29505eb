//! Engine output (a child's pipes, a container's log stream) forwarded into node-runner's log.

/// Logs one line of engine output, without its colours: escape sequences are noise in a log
/// file and in JSON logs.
pub(crate) fn log_line(engine: &str, stream: &'static str, line: &[u8]) {
    let text = strip_ansi(&String::from_utf8_lossy(line));
    let text = text.trim_end();
    if !text.is_empty() {
        tracing::info!(engine, stream, "{text}");
    }
}

/// Removes ANSI escape sequences (`ESC [ params final-byte`, and lone `ESC x` pairs).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            // Parameters and intermediates run until a final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped_from_engine_output() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026-01-01\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready \u{1b}(B"),
            "2026-01-01  INFO ready B"
        );
        assert_eq!(strip_ansi("plain [text]"), "plain [text]");
        assert_eq!(strip_ansi("cut \u{1b}[3"), "cut ");
    }
}
