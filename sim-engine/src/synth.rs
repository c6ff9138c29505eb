//! Deterministic stand-ins for a model: token counts, relevance and embedding vectors (the
//! generated text comes from [`crate::model`]).

use serde_json::Value;

/// Approximate token count of a prompt-like JSON value: words in strings, one per token id,
/// `text` of content parts (`[{"type":"text","text":...}]`), `content` of the Responses API's
/// input messages (`[{"role":"user","content":...}]`); images and the like count nothing.
pub(crate) fn count_tokens(value: &Value) -> u32 {
    match value {
        Value::String(text) => count_words(text),
        Value::Number(_) => 1,
        Value::Array(items) => items.iter().map(count_tokens).fold(0, u32::saturating_add),
        Value::Object(part) => part
            .get("text")
            .or_else(|| part.get("content"))
            .map_or(0, count_tokens),
        Value::Null | Value::Bool(_) => 0,
    }
}

/// Tokens of a text: one per word.
pub(crate) fn count_words(text: &str) -> u32 {
    text.split_whitespace()
        .count()
        .try_into()
        .unwrap_or(u32::MAX)
}

/// How well `document` answers `query`, in [0, 1]: the Jaccard similarity of their sets of
/// lower-cased words. A stand-in for a cross-encoder that ranks as a person would expect: more
/// of the query's words, higher.
pub(crate) fn relevance(query: &str, document: &str) -> f64 {
    let words = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|word| !word.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (query, document) = (words(query), words(document));
    let union = query.union(&document).count();
    if union == 0 {
        return 0.0;
    }
    query.intersection(&document).count() as f64 / union as f64
}

/// A unit-norm vector derived from a hash of `input` (a string or token ids), so equal inputs
/// embed equally and different ones almost surely differ.
pub(crate) fn embedding(input: &Value, dim: usize) -> Vec<f32> {
    // FNV-1a: tiny, stable across Rust versions (unlike std's DefaultHasher), good enough here.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    match input {
        Value::String(text) => feed(text.as_bytes()),
        other => feed(other.to_string().as_bytes()),
    }
    // SplitMix64 expands the seed into as many well-mixed numbers as needed.
    let mut seed = hash;
    let mut vector: Vec<f32> = (0..dim)
        .map(|_| {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // The top 24 bits fit an f32 mantissa exactly; map them onto [-1, 1).
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding(&Value::from("hello"), 16);
        assert_eq!(a, embedding(&Value::from("hello"), 16));
        assert_ne!(a, embedding(&Value::from("hullo"), 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4, "norm² {norm}");
    }

    #[test]
    fn counts_words_parts_and_token_ids() {
        let prompt = serde_json::json!(["two words", [1, 2, 3], [{"type": "text", "text": "one"}]]);
        assert_eq!(count_tokens(&prompt), 6);
    }
}
