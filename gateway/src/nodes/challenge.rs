//! Spot checks: does a rig serve the model it claims?
//!
//! The replica holding a rig's tunnel sends it, now and then ([`TrustConfig`]), a challenge: a
//! chat request like any other (same path, headers and shape; a fresh request id; a prompt
//! drawn from ordinary ones), deterministic (temperature 0, a seed) and asking for
//! log-probabilities. The same challenge goes to up to [`MAX_REFERENCES`] other rigs serving
//! the model: those the operator vouches for (`POST /admin/nodes/{id}/reference`) if there are
//! any, else verified ones, else any. The answers are compared token by
//! token, as LOGIC does: a rig running the same weights picks the same tokens at temperature 0,
//! and its log-probabilities differ only by what its hardware does to floating point. See
//! [`agree`] for the tolerance.
//!
//! The verdict: a rig that agrees with most references passes; one that disagrees with most of
//! them fails, when they are verified or at least two agree among themselves against it. With
//! no reference (it is the only rig of its model), or references split, there is no verdict.

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};

use super::trust::{CheckKind, TrustStatus};
use super::*;
use crate::config::TrustConfig;

/// Rigs a challenge is compared with.
pub const MAX_REFERENCES: usize = 3;

/// Ordinary-looking prompts a challenge is built from: two of them joined, so a rig cannot keep a
/// list of the few challenges there are.
const OPENERS: &[&str] = &[
    "Summarize in one sentence:",
    "Explain to a beginner:",
    "Write a short note about",
    "What are the main points of",
    "Give me three ideas for",
    "Rewrite more clearly:",
    "Translate to plain English:",
    "List the steps of",
];
const TOPICS: &[&str] = &[
    "the history of the bicycle",
    "how a heat pump works",
    "planning a vegetable garden",
    "the rules of chess",
    "why the sky is blue",
    "a weekly meal plan on a budget",
    "how vaccines train the immune system",
    "setting up a home network",
    "the water cycle",
    "writing a cover letter",
    "how compound interest works",
    "caring for a sourdough starter",
];

/// One generated token as an answer's log-probabilities give it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub token: String,
    pub logprob: f64,
    /// The most likely tokens at this step, with their log-probabilities.
    pub top: Vec<(String, f64)>,
}

/// The tokens of a chat answer with log-probabilities; `None` when it has none (or is not
/// one).
pub fn steps(answer: &[u8]) -> Option<Vec<Step>> {
    let answer: Value = serde_json::from_slice(answer).ok()?;
    let content = answer["choices"][0]["logprobs"]["content"].as_array()?;
    content
        .iter()
        .map(|step| {
            Some(Step {
                token: step["token"].as_str()?.to_owned(),
                logprob: step["logprob"].as_f64()?,
                top: step["top_logprobs"]
                    .as_array()
                    .map(|top| {
                        top.iter()
                            .filter_map(|t| {
                                Some((t["token"].as_str()?.to_owned(), t["logprob"].as_f64()?))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Two tokens within this of each other are a near-tie: hardware differences may flip the
/// pick, and the answers part ways there without either being wrong.
pub const NEAR_TIE: f64 = 0.2;

/// Whether two answers to the same challenge come from the same model: the same tokens (up to
/// a near-tie, after which they are compared no further), with log-probabilities within
/// `tolerance` of each other on average (`trust.logprob_tolerance`, 0.1 by default: GPUs,
/// kernels and batch sizes move them by hundredths; another model, or a quantization far from
/// the claimed one, by tenths to whole units). `Err` says how they differ.
pub fn agree(a: &[Step], b: &[Step], tolerance: f64) -> Result<(), String> {
    let mut compared = 0usize;
    let mut drift = 0.0;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.token != y.token {
            // Did `b` rate `a`'s token nearly as high as its own (or the other way)?
            let near = |s: &Step, other: &str| {
                s.top
                    .iter()
                    .any(|(t, lp)| t == other && (s.logprob - lp).abs() <= NEAR_TIE)
            };
            if near(y, &x.token) || near(x, &y.token) {
                break;
            }
            return Err(format!(
                "token {i}: {:?} where the reference has {:?}",
                x.token, y.token
            ));
        }
        compared += 1;
        drift += (x.logprob - y.logprob).abs();
    }
    if compared == 0 {
        return Err("no tokens in common".into());
    }
    let mean = drift / compared as f64;
    if mean > tolerance {
        return Err(format!(
            "log-probabilities {mean:.3} apart on average over {compared} tokens (tolerance {tolerance})"
        ));
    }
    Ok(())
}

/// A spot check's verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed,
    Failed(String),
    /// No reference to compare with, references that disagree among themselves, or no answer.
    Inconclusive(String),
}

/// The verdict on `checked` against `references` (each with whether it is verified).
pub fn judge(checked: &[Step], references: &[(bool, Vec<Step>)], tolerance: f64) -> Verdict {
    if references.is_empty() {
        return Verdict::Inconclusive("no other rig serves the model".into());
    }
    let verdicts: Vec<Result<(), String>> = references
        .iter()
        .map(|(_, steps)| agree(checked, steps, tolerance))
        .collect();
    let agreeing = verdicts.iter().filter(|v| v.is_ok()).count();
    if agreeing * 2 > references.len() {
        return Verdict::Passed;
    }
    let first_difference = verdicts
        .iter()
        .find_map(|v| v.as_ref().err().cloned())
        .unwrap_or_default();
    let verified = references.iter().all(|(verified, _)| *verified);
    // Unverified references outvote it only when they agree among themselves.
    let consistent = references.len() >= 2
        && references
            .windows(2)
            .all(|pair| agree(&pair[0].1, &pair[1].1, tolerance).is_ok());
    if agreeing * 2 < references.len() && (verified || consistent) {
        return Verdict::Failed(format!(
            "answered unlike the model it claims: {first_difference}"
        ));
    }
    Verdict::Inconclusive(format!("references split: {first_difference}"))
}

/// A challenge for `model`: a chat request as an application would send one.
fn challenge(model: &str, max_tokens: u32) -> Bytes {
    let mut rng = rand::rng();
    let opener = OPENERS.choose(&mut rng).copied().unwrap_or("Explain");
    let topic = TOPICS.choose(&mut rng).copied().unwrap_or("the weather");
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("{opener} {topic}.")}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": rng.random_range(1..1_000_000u32),
        "logprobs": true,
        "top_logprobs": 2,
    });
    Bytes::from(body.to_string())
}

/// A real chat request as a replay: temperature 0 (else `None`: nothing to compare), not
/// streamed, with log-probabilities, at most `max_tokens`.
pub fn replay(request: &[u8], max_tokens: u32) -> Option<Bytes> {
    let mut body: Value = serde_json::from_slice(request).ok()?;
    let object = body.as_object_mut()?;
    if object.get("temperature").and_then(Value::as_f64) != Some(0.0) {
        return None;
    }
    object.remove("stream_options");
    object.insert("stream".into(), json!(false));
    object.insert("logprobs".into(), json!(true));
    object.insert("top_logprobs".into(), json!(2));
    let asked = ["max_completion_tokens", "max_tokens"]
        .iter()
        .filter_map(|name| object.remove(*name)?.as_u64())
        .min()
        .unwrap_or(u64::from(max_tokens));
    object.insert(
        "max_tokens".into(),
        json!(asked.min(u64::from(max_tokens)).max(1)),
    );
    Some(Bytes::from(body.to_string()))
}

/// Sends a challenge to a backend; the answer's tokens, or why there are none.
async fn ask(backend: &Backend, body: Bytes, timeout: Duration) -> Result<Vec<Step>, String> {
    let request_id = crate::request_id::mint();
    let send = async {
        let response = backend
            .post("/chat/completions", body, Some(&request_id), None)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        steps(&bytes).ok_or_else(|| "an answer without log-probabilities".to_owned())
    };
    tokio::time::timeout(timeout, send)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

impl Nodes {
    /// Runs a spot check of the rig `id` (routed here, locally or through another replica) and
    /// records its verdict.
    pub async fn spot_check(&self, id: &str, config: &TrustConfig) -> Result<Verdict, ApiError> {
        self.check(id, config, None).await
    }

    /// Replays a real temperature-0 chat request the rig `id` served (sampled at
    /// `trust.replay_share`, never for a key with `"replay": false`): the same messages, with
    /// log-probabilities and at most `spot_check_tokens`, to the rig and to other rigs serving
    /// the model, judged as a spot check. A real prompt looks like nothing but itself.
    pub async fn replay_check(
        &self,
        id: &str,
        config: &TrustConfig,
        model: &str,
        request: &[u8],
    ) -> Result<Verdict, ApiError> {
        let Some(body) = replay(request, config.spot_check_tokens) else {
            return Ok(Verdict::Inconclusive(
                "not a temperature-0 chat request".into(),
            ));
        };
        self.check(id, config, Some((model.to_owned(), body))).await
    }

    async fn check(
        &self,
        id: &str,
        config: &TrustConfig,
        given: Option<(String, Bytes)>,
    ) -> Result<Verdict, ApiError> {
        let set = self.backends.snapshot();
        let Some(backend) = set.all().iter().find(|b| b.id == id).cloned() else {
            return Err(ApiError::Unavailable(format!(
                "The rig `{id}` is not in routing: nothing to check."
            )));
        };
        let model = match &given {
            Some((model, _)) => Some(model.clone()),
            None => backend.models.choose(&mut rand::rng()).cloned(),
        };
        let Some(model) = model else {
            return Err(ApiError::Unavailable(format!(
                "The rig `{id}` serves no model."
            )));
        };
        let others: Vec<Arc<Backend>> = set
            .all()
            .iter()
            .filter(|b| {
                b.id != id && b.rig.is_some() && b.is_healthy() && b.models.contains(&model)
            })
            .cloned()
            .collect();
        // (vouched for by the operator, verified, rig)
        let mut candidates = Vec::with_capacity(others.len());
        for other in others {
            let status = self.trust(&other.id).await?.status;
            let vouched = self
                .get::<NodeRecord>(NODE_KIND, &other.id)
                .await?
                .is_some_and(|record| record.reference);
            if status != TrustStatus::Quarantined && status != TrustStatus::Suspect {
                candidates.push((vouched, vouched || status == TrustStatus::Verified, other));
            }
        }
        // The operator's reference rigs if there are any; else verified ones; else whoever
        // serves the model.
        if candidates.iter().any(|(vouched, ..)| *vouched) {
            candidates.retain(|(vouched, ..)| *vouched);
        } else if candidates.iter().any(|(_, verified, _)| *verified) {
            candidates.retain(|(_, verified, _)| *verified);
        }
        let mut candidates: Vec<(bool, Arc<Backend>)> = candidates
            .into_iter()
            .map(|(_, verified, backend)| (verified, backend))
            .collect();
        candidates.truncate(MAX_REFERENCES);
        let body = match given {
            Some((_, body)) => body,
            None => challenge(&model, config.spot_check_tokens),
        };
        let timeout = Duration::from_secs(config.spot_check_timeout_secs.max(1));
        let (checked, references) = tokio::join!(
            ask(&backend, body.clone(), timeout),
            futures::future::join_all(candidates.iter().map(|(_, reference)| ask(
                reference,
                body.clone(),
                timeout
            )))
        );
        let checked = match checked {
            Ok(steps) => steps,
            Err(why) => {
                // A rig that cannot answer now is overloaded or leaving, not caught cheating.
                self.count_check(CheckKind::SpotCheck, "inconclusive");
                return Ok(Verdict::Inconclusive(format!("the rig: {why}")));
            }
        };
        let references: Vec<(bool, Vec<Step>)> = candidates
            .iter()
            .zip(references)
            .filter_map(|((verified, _), answer)| Some((*verified, answer.ok()?)))
            .collect();
        let verdict = judge(&checked, &references, config.logprob_tolerance);
        match &verdict {
            Verdict::Passed => {
                self.record_check(id, CheckKind::SpotCheck, None).await?;
            }
            Verdict::Failed(why) => {
                self.record_check(id, CheckKind::SpotCheck, Some(why))
                    .await?;
            }
            Verdict::Inconclusive(why) => {
                self.count_check(CheckKind::SpotCheck, "inconclusive");
                tracing::debug!(node = %id, why, "spot check inconclusive");
            }
        }
        Ok(verdict)
    }

    /// Spot-checks the rigs tunnelled here, each about once per `spot_check_interval_secs`
    /// (jittered, so checks do not come in step), forever. Off when the interval is 0.
    pub async fn run_spot_checks(self: Arc<Self>, config: TrustConfig) {
        if config.spot_check_interval_secs == 0 {
            return;
        }
        let interval = Duration::from_secs(config.spot_check_interval_secs);
        let mut due: HashMap<String, Instant> = HashMap::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let routed: Vec<String> = self
                .tunnels()
                .iter()
                .filter(|(_, t)| t.backend.is_some())
                .map(|(id, _)| id.clone())
                .collect();
            due.retain(|id, _| routed.contains(id));
            let now = Instant::now();
            for id in routed {
                // A rig is first checked soon after it joins, at a random point of the interval.
                let at = due
                    .entry(id.clone())
                    .or_insert_with(|| now + interval.mul_f64(rand::rng().random_range(0.0..1.0)));
                if *at > now {
                    continue;
                }
                *at = now + interval.mul_f64(rand::rng().random_range(0.5..1.5));
                if let Err(err) = self.spot_check(&id, &config).await {
                    tracing::debug!(node = %id, error = %err, "spot check not run");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGPROB_TOLERANCE: f64 = 0.1;

    fn answer(tokens: &[(&str, f64)]) -> Vec<Step> {
        tokens
            .iter()
            .map(|(t, lp)| Step {
                token: (*t).into(),
                logprob: *lp,
                top: vec![((*t).into(), *lp)],
            })
            .collect()
    }

    #[test]
    fn the_same_model_agrees_within_hardware_noise() {
        let a = answer(&[("the ", -0.5), ("fox ", -1.0), ("runs ", -0.2)]);
        let b = answer(&[("the ", -0.52), ("fox ", -0.97), ("runs ", -0.21)]);
        assert_eq!(agree(&a, &b, LOGPROB_TOLERANCE), Ok(()));
        // Another model: other tokens.
        let c = answer(&[("a ", -0.5), ("dog ", -1.0)]);
        assert!(
            agree(&a, &c, LOGPROB_TOLERANCE)
                .unwrap_err()
                .contains("token 0")
        );
        // Same tokens, log-probabilities a unit apart: another model (or weights) behind them.
        let d = answer(&[("the ", -1.5), ("fox ", -2.0), ("runs ", -1.2)]);
        assert!(agree(&a, &d, LOGPROB_TOLERANCE).is_err());
    }

    #[test]
    fn a_near_tie_may_part_the_answers() {
        let a = answer(&[("the ", -0.5), ("fox ", -0.70)]);
        let mut b = answer(&[("the ", -0.5), ("dog ", -0.69)]);
        b[1].top.push(("fox ".into(), -0.71));
        assert_eq!(agree(&a, &b, LOGPROB_TOLERANCE), Ok(()));
        b[1].top[1].1 = -3.0;
        assert!(agree(&a, &b, LOGPROB_TOLERANCE).is_err());
    }

    #[test]
    fn the_majority_of_references_decides() {
        let honest = answer(&[("the ", -0.5), ("fox ", -1.0)]);
        let other = answer(&[("a ", -0.4), ("dog ", -0.9)]);
        let refs = |answers: &[(bool, &Vec<Step>)]| -> Vec<(bool, Vec<Step>)> {
            answers.iter().map(|(v, a)| (*v, (*a).clone())).collect()
        };
        assert_eq!(
            judge(
                &honest,
                &refs(&[(false, &honest), (false, &honest), (false, &other)]),
                0.1
            ),
            Verdict::Passed
        );
        assert!(matches!(
            judge(&other, &refs(&[(false, &honest), (false, &honest)]), 0.1),
            Verdict::Failed(_)
        ));
        // One verified reference is enough to fail it; one unverified is not.
        assert!(matches!(
            judge(&other, &refs(&[(true, &honest)]), 0.1),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            judge(&other, &refs(&[(false, &honest)]), 0.1),
            Verdict::Inconclusive(_)
        ));
        assert!(matches!(judge(&honest, &[], 0.1), Verdict::Inconclusive(_)));
    }
}
