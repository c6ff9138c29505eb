//! The console's layout and the pieces every page uses. Every value goes through maud's
//! `(...)`, which escapes it: nothing here writes raw HTML from data.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::session::{Role, Session};

/// The console's sections, as the navigation shows them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Rigs,
    Models,
    Keys,
    Accounts,
    Plugins,
    Usage,
    Rewards,
    Batches,
    Operators,
    Webhooks,
    AppUsage,
    AppBatches,
    Playground,
    OwnRigs,
}

const ADMIN_NAV: &[(Section, &str, &str)] = &[
    (Section::Overview, "/console", "Overview"),
    (Section::Rigs, "/console/rigs", "Rigs"),
    (Section::Models, "/console/models", "Models"),
    (Section::Keys, "/console/keys", "Keys"),
    (Section::Accounts, "/console/accounts", "Accounts"),
    (Section::Plugins, "/console/plugins", "Plugins"),
    (Section::Usage, "/console/usage", "Usage"),
    (Section::Rewards, "/console/rewards", "Rewards"),
    (Section::Batches, "/console/batches", "Batches"),
    (Section::Operators, "/console/operators", "Operators"),
    (Section::Webhooks, "/console/webhooks", "Webhooks"),
];

const OPERATOR_NAV: &[(Section, &str, &str)] =
    &[(Section::OwnRigs, "/console/operator", "Rigs and earnings")];

const APP_NAV: &[(Section, &str, &str)] = &[
    (Section::AppUsage, "/console/app", "Usage"),
    (Section::AppBatches, "/console/app/batches", "Batches"),
    (Section::Playground, "/console/app/playground", "Playground"),
];

/// A whole document: the head every page shares, then `body`.
fn document(title: &str, csrf: Option<&str>, body_class: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Garage console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
                @if let Some(csrf) = csrf { meta name="csrf-token" content=(csrf); }
            }
            body class=[body_class] { (body) }
        }
    }
}

/// A page of a logged-in person's console.
pub fn page(session: &Session, section: Section, title: &str, body: Markup) -> Markup {
    let (nav, who) = match &session.role {
        Role::Admin => (ADMIN_NAV, "operator".to_owned()),
        Role::App { key_id } => (APP_NAV, format!("app · {key_id}")),
        Role::Operator { name, .. } => (OPERATOR_NAV, format!("rig owner · {name}")),
    };
    document(
        title,
        Some(&session.csrf),
        None,
        html! {
            header.top {
                span.brand { "Garage" }
                nav {
                    @for (s, href, label) in nav {
                        a href=(href) class=[(*s == section).then_some("current")] { (label) }
                    }
                }
                span.who { (who) }
                form method="post" action="/console/logout" {
                    input type="hidden" name="csrf" value=(session.csrf);
                    button type="submit" { "Log out" }
                }
            }
            main {
                h1 { (title) }
                (body)
            }
        },
    )
}

/// The login page, with a message when a login was refused.
pub fn login(message: Option<&str>) -> Markup {
    document(
        "Log in",
        None,
        Some("login"),
        html! {
            main {
                h1 { "Garage console" }
                p { "Paste the admin token (the gateway's operator), an operator token (rig \
                     owners) or an API key (app developers). It is exchanged for a session \
                     cookie and not kept." }
                @if let Some(message) = message {
                    p.error role="alert" { (message) }
                }
                form method="post" action="/console/login" {
                    label for="token" { "Token" }
                    input id="token" name="token" type="password" autocomplete="off" required;
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

/// An error, as a page with its status.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let page = document(
        "Error",
        None,
        None,
        html! {
            main {
                h1 { "Something went wrong" }
                p.error role="alert" { (message) }
                p { a href="/console" { "Back to the console" } }
            }
        },
    );
    (status, page).into_response()
}

/// A hidden field with the session's CSRF token, for a form.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A batch's status and progress, as two table cells.
pub fn batch_progress(batch: &crate::batch::BatchObject) -> Markup {
    let counts = &batch.request_counts;
    html! {
        td { (format!("{:?}", batch.status).to_lowercase()) }
        td {
            progress max=(counts.total.max(1)) value=(counts.completed + counts.failed) {}
            " " (counts.completed) " done, " (counts.failed) " failed of " (counts.total)
        }
    }
}

/// The command that enrolls a rig with `token` at this gateway, shown once.
pub fn enrollment_command(state: &crate::state::AppState, token: &str) -> Markup {
    let gateway = format!("http://{}", state.config().listen);
    html! {
        pre { code data-secret { "node-runner run --gateway-url " (gateway) " --enrollment-token " (token) } }
    }
}

/// A number with thousands separators (`12,345`).
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How long ago a Unix time was, for people.
pub fn ago(unix_secs: u64) -> String {
    let secs = crate::keys::unix_now().saturating_sub(unix_secs);
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

/// A bar chart (SVG) of values by label: one bar per value, its label and value in its
/// tooltip. Drawn here rather than by a charting library: a handful of rectangles, and no
/// script needed to see them.
pub fn bars(points: &[(String, f64)], unit: &str) -> Markup {
    const W: f64 = 640.0;
    const H: f64 = 160.0;
    let max = points
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let step = W / points.len().max(1) as f64;
    // At most about eight labels: thirty days' labels side by side would overlap.
    let every = points.len().div_ceil(8).max(1);
    html! {
        svg.chart viewBox=(format!("0 0 {W} {}", H + 20.0)) role="img"
            aria-label=(format!("{unit} by day")) {
            @for (i, (label, value)) in points.iter().enumerate() {
                @let height = (value / max * H).max(1.0);
                rect x=(format!("{:.1}", i as f64 * step + 2.0)) y=(format!("{:.1}", H - height))
                    width=(format!("{:.1}", (step - 4.0).max(1.0))) height=(format!("{height:.1}")) {
                    title { (label) ": " (format!("{value:.4}")) " " (unit) }
                }
                @if i % every == 0 {
                    text x=(format!("{:.1}", i as f64 * step + step / 2.0)) y=(format!("{}", H + 15.0))
                        text-anchor="middle" { (label.get(5..).unwrap_or(label)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(12_345_678), "12,345,678");
    }

    #[test]
    fn what_a_page_shows_is_escaped() {
        let session = Session {
            role: Role::App {
                key_id: "<script>alert(1)</script>".into(),
            },
            csrf: "\"><img src=x onerror=alert(1)>".into(),
            created_at: 0,
        };
        let html = page(&session, Section::AppUsage, "<b>title</b>", html! {}).into_string();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;title&lt;/b&gt;"), "{html}");
    }
}
