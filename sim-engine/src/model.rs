//! The simulated language model: a small vocabulary and, for every context, a next-token
//! distribution that is a pure function of the model's name and the context (the prompt and the
//! tokens generated so far). Two engines serving the same model therefore agree on every token
//! and log-probability, and an engine generating as another model does not: what a gateway
//! needs to tell an honest rig from one serving a smaller model under a bigger name.
//!
//! What seeds what:
//! - a prompt hashes (FNV-1a over its messages' roles and texts, or the completion prompt) into
//!   one number; with the model name it makes the first [`Context`];
//! - each generated token moves the context on, so the distribution of token `i` depends on the
//!   model, the prompt and tokens `0..i`, and on nothing else;
//! - the logits of a context are a hash of the context and each vocabulary entry, shaped as
//!   Gumbel noise so that some steps are confident and others near ties;
//! - decoding picks from them: the most likely token at temperature 0 (the seed plays no part,
//!   as in vLLM), a draw seeded by the request's `seed` and the context at other temperatures,
//!   or, for requests that neither ask for temperature 0 nor give a seed, the fixed script the
//!   simulator always spoke ("the quick brown fox ..."), so that existing clients see no change;
//! - reported log-probabilities are the model's own (before temperature, as vLLM's default
//!   `raw_logprobs`), plus, on an engine configured with [`Noise`], a small deviation drawn from
//!   the engine's id, the context and the token: what different GPUs legitimately produce. The
//!   noise never changes which token is chosen.
//!
//! Everything is integer hashing and a few `f64` operations, so the same binary on any machine
//! gives the same bits.

use std::fmt::Write as _;

use serde_json::Value;

/// A token: its index in [`VOCAB`].
pub(crate) type TokenId = u16;

/// The vocabulary, one word per token. Every token ends with a space, so that a streamed delta
/// is exactly one token and the deltas concatenate to the whole text. The first
/// [`SCRIPT_LEN`] are the script of requests that sample without a seed (see [`Decoding`]);
/// a few carry non-ASCII letters so that `bytes` and `text_offset` (characters, not bytes)
/// are exercised.
pub(crate) const VOCAB: [&str; 128] = [
    // The script.
    "the ",
    "quick ",
    "brown ",
    "fox ",
    "jumps ",
    "over ",
    "a ",
    "lazy ",
    "dog ",
    "while ",
    "simulated ",
    "engines ",
    "answer ",
    "every ",
    "prompt ",
    "politely ",
    // The rest of the vocabulary.
    "and ",
    "of ",
    "to ",
    "in ",
    "is ",
    "it ",
    "that ",
    "was ",
    "for ",
    "on ",
    "are ",
    "with ",
    "as ",
    "be ",
    "at ",
    "one ",
    "have ",
    "this ",
    "from ",
    "by ",
    "not ",
    "but ",
    "what ",
    "all ",
    "were ",
    "when ",
    "we ",
    "there ",
    "can ",
    "an ",
    "your ",
    "which ",
    "their ",
    "said ",
    "if ",
    "do ",
    "will ",
    "each ",
    "about ",
    "how ",
    "up ",
    "out ",
    "them ",
    "then ",
    "she ",
    "many ",
    "some ",
    "so ",
    "these ",
    "would ",
    "other ",
    "into ",
    "has ",
    "more ",
    "her ",
    "two ",
    "like ",
    "him ",
    "see ",
    "time ",
    "could ",
    "no ",
    "make ",
    "than ",
    "first ",
    "been ",
    "its ",
    "who ",
    "now ",
    "people ",
    "my ",
    "made ",
    "down ",
    "only ",
    "way ",
    "find ",
    "use ",
    "may ",
    "water ",
    "long ",
    "little ",
    "very ",
    "after ",
    "words ",
    "called ",
    "just ",
    "where ",
    "most ",
    "know ",
    "model ",
    "token ",
    "gateway ",
    "garage ",
    "rig ",
    "verified ",
    "honest ",
    "tensor ",
    "kernel ",
    "cache ",
    "light ",
    "night ",
    "river ",
    "stone ",
    "green ",
    "cloud ",
    "music ",
    "café ",
    "naïve ",
    "über ",
    "señor ",
    "déjà ",
    "vu ",
];

/// Tokens of the script spoken by requests that sample without a seed: the first of [`VOCAB`].
const SCRIPT_LEN: usize = 16;

/// How peaked the simulated distributions are: the scale of the Gumbel-shaped logits. At 1.5
/// the most likely token usually has a log-probability between -0.1 and -1.5 and a few steps
/// in a hundred are near ties, much like a chat model at temperature 0; smaller is flatter.
const LOGIT_SCALE: f64 = 1.5;

/// The most top log-probabilities a request may ask for: vLLM's default `--max-logprobs`.
pub(crate) const MAX_LOGPROBS: usize = 20;

/// The text of a token.
pub(crate) fn token_text(token: TokenId) -> &'static str {
    VOCAB[usize::from(token)]
}

/// The text of a run of tokens.
pub(crate) fn text(tokens: &[TokenId]) -> String {
    let mut out = String::with_capacity(tokens.len() * 8);
    for &token in tokens {
        out.push_str(token_text(token));
    }
    out
}

/// SplitMix64's finaliser: a bijection that mixes every input bit into every output bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in (0, 1), never exactly 0 or 1 (logarithms of it stay finite).
fn unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// FNV-1a: tiny and stable across Rust versions (unlike std's `DefaultHasher`).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new(domain: &str) -> Self {
        let mut fnv = Fnv(0xcbf2_9ce4_8422_2325);
        fnv.field(domain.as_bytes());
        fnv
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

/// What a model is asked: a chat's messages (the Responses API's input becomes the same), or a
/// completion's prompt, hashed into one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prompt(u64);

impl Prompt {
    /// A conversation, as `(role, content)` pairs; content is a string or a list of parts
    /// (text parts are joined by newlines, as vLLM's chat renderer does; others hash whole).
    pub(crate) fn chat<'a>(messages: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Prompt {
        let mut fnv = Fnv::new("chat");
        let mut text = String::new();
        for (role, content) in messages {
            fnv.field(role.as_bytes());
            text.clear();
            content_text(content, &mut text);
            fnv.field(text.as_bytes());
        }
        Prompt(fnv.0)
    }

    /// A text completion's prompt: a string, or token ids (or lists of either) taken as JSON.
    pub(crate) fn completion(prompt: &Value) -> Prompt {
        let mut fnv = Fnv::new("completion");
        match prompt {
            Value::String(text) => fnv.field(text.as_bytes()),
            other => fnv.field(other.to_string().as_bytes()),
        }
        Prompt(fnv.0)
    }
}

/// Appends what a model reads of a message's content.
fn content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(text) => out.push_str(text),
        Value::Null => {}
        Value::Array(parts) => {
            for (index, part) in parts.iter().enumerate() {
                if index > 0 {
                    out.push('\n');
                }
                match part.get("text").and_then(Value::as_str) {
                    Some(text) => out.push_str(text),
                    None => {
                        let _ = write!(out, "{part}");
                    }
                }
            }
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

/// Where generation stands: the model, the prompt and the tokens so far, as one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Context(u64);

impl Context {
    fn new(model: &str, prompt: Prompt) -> Context {
        let mut fnv = Fnv::new("model");
        fnv.field(model.as_bytes());
        Context(mix(fnv.0 ^ mix(prompt.0)))
    }

    fn push(self, token: TokenId) -> Context {
        Context(mix(self.0 ^ mix(0x746f_6b65_6e00_0000 | u64::from(token))))
    }

    /// The model's log-probabilities of every token after this context.
    fn logprobs(self) -> [f64; VOCAB.len()] {
        let mut logits = [0.0f64; VOCAB.len()];
        for (token, logit) in logits.iter_mut().enumerate() {
            let u = unit(mix(self.0 ^ mix(0x6c6f_6769_7400_0000 | token as u64)));
            // A Gumbel draw: a few tokens stand out, most trail, like a real model's logits.
            *logit = -LOGIT_SCALE * (-u.ln()).ln();
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        logits.iter_mut().for_each(|l| *l -= log_sum);
        logits
    }
}

/// How a request picks its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Decoding {
    /// Temperature 0: the most likely token every time (the lowest id on a tie).
    Greedy,
    /// A positive temperature with a seed: a draw from the tempered distribution, seeded by
    /// `seed` and the context, so the same request gets the same answer.
    Seeded { seed: u64, temperature: f64 },
    /// A positive temperature (vLLM's default is 1) and no seed: the fixed script the simulator
    /// has always spoken, cheap and predictable for tests and benchmarks.
    Script,
}

impl Decoding {
    /// From a request's `temperature` (vLLM's default is 1) and `seed`; a negative temperature
    /// is vLLM's error message.
    pub(crate) fn new(temperature: Option<f64>, seed: Option<i64>) -> Result<Decoding, String> {
        let temperature = temperature.unwrap_or(1.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(format!(
                "temperature must be non-negative, got {temperature}."
            ));
        }
        Ok(match seed {
            _ if temperature == 0.0 => Decoding::Greedy,
            // The seed's bits, whatever its sign: a seed is a name, not a quantity.
            Some(seed) => Decoding::Seeded {
                seed: seed as u64,
                temperature,
            },
            None => Decoding::Script,
        })
    }
}

/// Legitimate hardware noise on reported log-probabilities: each engine deviates a little, in
/// its own deterministic way, and never so as to change a token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Noise {
    /// Standard deviation of the deviation, in nats; 0 reports the model's exact values.
    pub(crate) sigma: f64,
    /// Seeds the deviations: a hash of the engine's id.
    pub(crate) engine: u64,
}

impl Noise {
    pub(crate) fn new(sigma: f64, engine_id: &str) -> Noise {
        let mut fnv = Fnv::new("engine");
        fnv.field(engine_id.as_bytes());
        Noise {
            sigma,
            engine: fnv.0,
        }
    }

    /// What this engine reports for `token`'s log-probability `logprob` after `context`: a
    /// Gaussian deviation (Box-Muller) from the engine, the context and the token, kept at or
    /// below 0. The same token at the same step always gets the same value, sampled or top.
    fn apply(self, context: Context, token: TokenId, logprob: f64) -> f64 {
        if self.sigma == 0.0 {
            return logprob;
        }
        let bits = mix(self.engine ^ context.0 ^ mix(0x6e6f_6973_6500_0000 | u64::from(token)));
        let (u1, u2) = (unit(bits), unit(mix(bits)));
        let gaussian = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (logprob + self.sigma * gaussian).min(0.0)
    }
}

/// The log-probabilities reported for one generated token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Step {
    /// The generated token's.
    pub(crate) logprob: f32,
    /// The most likely tokens' (as many as asked), most likely first.
    pub(crate) top: Vec<(TokenId, f32)>,
}

/// What a request generated.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Generation {
    pub(crate) tokens: Vec<TokenId>,
    /// One per token, when log-probabilities were asked for.
    pub(crate) steps: Option<Vec<Step>>,
}

impl Generation {
    /// Tokens generated.
    pub(crate) fn count(&self) -> u32 {
        // The plan bounds a generation by the context length, far below u32::MAX.
        u32::try_from(self.tokens.len()).unwrap_or(u32::MAX)
    }

    /// Ends the generation before the first of `stops` to appear in its text, as vLLM's `stop`
    /// does (the stop string is not part of the output): the tokens that end before it are
    /// kept, a token the stop string begins inside of is not. Returns the stop string that
    /// ended it, the earliest to start (the first listed among those starting together).
    pub(crate) fn cut_at_stop(&mut self, stops: &[String]) -> Option<String> {
        let text = text(&self.tokens);
        let (at, stop) = stops
            .iter()
            .filter(|stop| !stop.is_empty())
            .filter_map(|stop| Some((text.find(stop.as_str())?, stop)))
            .min_by_key(|(at, _)| *at)?;
        let mut end = 0;
        let kept = self
            .tokens
            .iter()
            .take_while(|&&token| {
                end += token_text(token).len();
                end <= at
            })
            .count();
        self.tokens.truncate(kept);
        if let Some(steps) = &mut self.steps {
            steps.truncate(kept);
        }
        Some(stop.clone())
    }
}

/// What a generation needs to know.
#[derive(Clone, Copy)]
pub(crate) struct Request<'a> {
    /// The model to generate as: the name served, or the one an impersonator copies.
    pub(crate) model: &'a str,
    pub(crate) prompt: Prompt,
    pub(crate) decoding: Decoding,
    /// How many tokens.
    pub(crate) tokens: u32,
    /// `Some(k)`: report log-probabilities, with the `k` most likely tokens at each step.
    pub(crate) top_logprobs: Option<usize>,
}

/// Generates `request.tokens` tokens. Only requests that need the model's distribution (greedy,
/// seeded, or asking for log-probabilities) compute it: the script alone costs nothing, which
/// keeps the engine a fair baseline for the gateway's benchmarks.
pub(crate) fn generate(request: Request<'_>, noise: Noise) -> Generation {
    let count = request.tokens as usize;
    if request.decoding == Decoding::Script && request.top_logprobs.is_none() {
        return Generation {
            tokens: (0..count).map(|i| (i % SCRIPT_LEN) as TokenId).collect(),
            steps: None,
        };
    }
    let mut context = Context::new(request.model, request.prompt);
    let mut tokens = Vec::with_capacity(count);
    let mut steps = request.top_logprobs.map(|_| Vec::with_capacity(count));
    for index in 0..count {
        let logprobs = context.logprobs();
        let token = match request.decoding {
            Decoding::Greedy => most_likely(&logprobs),
            Decoding::Seeded { seed, temperature } => {
                let u = unit(mix(context.0 ^ mix(seed ^ 0x7365_6564_0000_0000)));
                draw(&logprobs, temperature, u)
            }
            Decoding::Script => (index % SCRIPT_LEN) as TokenId,
        };
        if let (Some(steps), Some(k)) = (steps.as_mut(), request.top_logprobs) {
            let report =
                |token: TokenId| noise.apply(context, token, logprobs[usize::from(token)]) as f32;
            steps.push(Step {
                logprob: report(token),
                top: top_tokens(&logprobs, k)
                    .into_iter()
                    .map(|t| (t, report(t)))
                    .collect(),
            });
        }
        tokens.push(token);
        context = context.push(token);
    }
    Generation { tokens, steps }
}

fn most_likely(logprobs: &[f64]) -> TokenId {
    let mut best = 0;
    for (token, logprob) in logprobs.iter().enumerate() {
        if *logprob > logprobs[best] {
            best = token;
        }
    }
    best as TokenId
}

/// The token at cumulative probability `u` of the distribution tempered by `temperature`.
fn draw(logprobs: &[f64], temperature: f64, u: f64) -> TokenId {
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logprobs
        .iter()
        .map(|l| ((l - max) / temperature).exp())
        .collect();
    let mut left = u * weights.iter().sum::<f64>();
    for (token, weight) in weights.iter().enumerate() {
        left -= weight;
        if left < 0.0 {
            return token as TokenId;
        }
    }
    // Rounding left a sliver past the last weight: the most likely token takes it.
    most_likely(logprobs)
}

/// The `k` most likely tokens, most likely first (the lower id first on a tie).
fn top_tokens(logprobs: &[f64], k: usize) -> Vec<TokenId> {
    let mut order: Vec<TokenId> = (0..logprobs.len() as TokenId).collect();
    order.sort_by(|a, b| {
        logprobs[usize::from(*b)]
            .total_cmp(&logprobs[usize::from(*a)])
            .then(a.cmp(b))
    });
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::json;

    use super::*;

    fn request<'a>(model: &'a str, prompt: &str, decoding: Decoding) -> Request<'a> {
        Request {
            model,
            prompt: Prompt::chat([("user", &json!(prompt))]),
            decoding,
            tokens: 64,
            top_logprobs: Some(5),
        }
    }

    #[test]
    fn the_vocabulary_is_words_each_once() {
        let unique: HashSet<&str> = VOCAB.iter().copied().collect();
        assert_eq!(unique.len(), VOCAB.len());
        assert!(
            VOCAB
                .iter()
                .all(|t| t.ends_with(' ') && !t.trim().is_empty())
        );
        assert_eq!(text(&[0, 1, 2]), "the quick brown ");
    }

    #[test]
    fn distributions_are_proper_and_plausible() {
        let mut context = Context::new("m", Prompt::completion(&json!("x")));
        let mut top = Vec::new();
        for token in 0..500 {
            let logprobs = context.logprobs();
            let total: f64 = logprobs.iter().map(|l| l.exp()).sum();
            assert!((total - 1.0).abs() < 1e-9, "{total}");
            top.push(logprobs[usize::from(most_likely(&logprobs))]);
            context = context.push(token % 128);
        }
        let mean = top.iter().sum::<f64>() / top.len() as f64;
        assert!((-1.5..-0.1).contains(&mean), "mean top logprob {mean}");
    }

    #[test]
    fn a_stop_string_cuts_before_the_token_it_starts_in() {
        let script = |steps| Generation {
            tokens: (0..8).collect(),
            steps,
        };
        let cut = |stops: &[&str]| {
            let mut generation = script(None);
            let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
            let stop = generation.cut_at_stop(&stops);
            (text(&generation.tokens), stop)
        };
        // "the quick brown fox jumps over a lazy "
        assert_eq!(
            cut(&["fox"]),
            ("the quick brown ".into(), Some("fox".into()))
        );
        // Inside a token, or across two: that token goes too.
        assert_eq!(cut(&["ick"]), ("the ".into(), Some("ick".into())));
        assert_eq!(cut(&["n fo"]), ("the quick ".into(), Some("n fo".into())));
        // The earliest wins, whatever the order; none found, nothing cut.
        assert_eq!(
            cut(&["lazy", "over"]),
            ("the quick brown fox jumps ".into(), Some("over".into()))
        );
        assert_eq!(cut(&["zebra", ""]).1, None);
        assert_eq!(cut(&["zebra"]).0.len(), text(&script(None).tokens).len());
        // Log-probabilities are cut with their tokens.
        let mut generation = script(Some(vec![
            Step {
                logprob: -0.5,
                top: Vec::new()
            };
            8
        ]));
        generation.cut_at_stop(&["fox".to_owned()]);
        assert_eq!(generation.steps.map(|s| s.len()), Some(3));
    }

    #[test]
    fn greedy_depends_on_model_and_prompt_not_seed() {
        let a = generate(request("m", "hi", Decoding::Greedy), Noise::default());
        assert_eq!(
            a,
            generate(request("m", "hi", Decoding::Greedy), Noise::default())
        );
        assert_ne!(
            a.tokens,
            generate(request("n", "hi", Decoding::Greedy), Noise::default()).tokens
        );
        assert_ne!(
            a.tokens,
            generate(request("m", "ho", Decoding::Greedy), Noise::default()).tokens
        );
        assert_eq!(
            Decoding::new(Some(0.0), Some(7)),
            Ok(Decoding::Greedy),
            "the seed plays no part at temperature 0"
        );
        // Greedy picks the top token, so it heads every step's top list.
        for (token, step) in a.tokens.iter().zip(a.steps.iter().flatten()) {
            assert_eq!((*token, step.logprob), step.top[0]);
            assert!(step.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }

    #[test]
    fn seeded_sampling_repeats_per_seed() {
        let seeded = |seed| Decoding::Seeded {
            seed,
            temperature: 1.0,
        };
        let a = generate(request("m", "hi", seeded(1)), Noise::default());
        assert_eq!(a, generate(request("m", "hi", seeded(1)), Noise::default()));
        assert_ne!(
            a.tokens,
            generate(request("m", "hi", seeded(2)), Noise::default()).tokens
        );
        let greedy = generate(request("m", "hi", Decoding::Greedy), Noise::default());
        assert_ne!(a.tokens, greedy.tokens, "temperature 1 is not greedy");
    }

    #[test]
    fn the_script_is_unchanged_and_costs_nothing_without_logprobs() {
        let mut plain = request("m", "hi", Decoding::Script);
        plain.tokens = 18;
        plain.top_logprobs = None;
        let generation = generate(plain, Noise::default());
        assert_eq!(generation.steps, None);
        assert!(text(&generation.tokens).starts_with("the quick brown fox "));
        assert_eq!(generation.tokens[16..], [0, 1]);
        plain.top_logprobs = Some(0);
        let with_logprobs = generate(plain, Noise::default());
        assert_eq!(with_logprobs.tokens, generation.tokens);
        assert!(
            with_logprobs
                .steps
                .is_some_and(|s| s.iter().all(|s| s.top.is_empty()))
        );
    }

    #[test]
    fn noise_is_small_per_engine_and_keeps_the_tokens() {
        let honest = generate(request("m", "hi", Decoding::Greedy), Noise::default());
        let noisy = |engine| {
            generate(
                request("m", "hi", Decoding::Greedy),
                Noise::new(0.01, engine),
            )
        };
        let (a, b) = (noisy("a"), noisy("b"));
        assert_eq!(a, noisy("a"));
        assert_ne!(a, b);
        for generation in [&a, &b] {
            assert_eq!(generation.tokens, honest.tokens);
            for (noisy, exact) in generation
                .steps
                .iter()
                .flatten()
                .zip(honest.steps.iter().flatten())
            {
                assert!(
                    (noisy.logprob - exact.logprob).abs() < 0.06,
                    "{noisy:?} {exact:?}"
                );
                assert!(noisy.logprob <= 0.0);
            }
        }
    }

    #[test]
    fn chat_prompts_hash_roles_and_texts() {
        let hi = json!("hi");
        let parts = json!([{"type": "text", "text": "hi"}]);
        assert_eq!(
            Prompt::chat([("user", &hi)]),
            Prompt::chat([("user", &parts)])
        );
        assert_ne!(
            Prompt::chat([("user", &hi)]),
            Prompt::chat([("system", &hi)])
        );
        assert_ne!(Prompt::chat([("user", &hi)]), Prompt::completion(&hi));
        assert_eq!(Decoding::new(None, None), Ok(Decoding::Script));
        assert!(Decoding::new(Some(-1.0), None).is_err());
    }
}
