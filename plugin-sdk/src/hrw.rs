//! Rendezvous (highest random weight) hashing: a stable, spread-out preference order of
//! backends for a key, which moves only the keys of a backend that comes or goes.
//!
//! Every gateway replica and every version of a plugin must rank alike, so the hash is fixed
//! here (FNV-1a over the key and the backend's [`candidate_key`](crate::candidate_key), then
//! MurmurHash3's 64-bit finaliser for avalanche) and must not change: changing it would move
//! every prefix off the rig whose cache holds it.

/// The weight of a backend (its [`Candidate::key`](crate::Candidate::key)) for `key`: the
/// backend with the highest weight is the key's home.
///
/// ```
/// use garage_plugin_sdk::{candidate_key, hrw};
///
/// let (a, b) = (candidate_key("rig-a"), candidate_key("rig-b"));
/// // Deterministic: the same on every replica and in every build.
/// assert_eq!(hrw::score(42, a), hrw::score(42, a));
/// assert_ne!(hrw::score(42, a), hrw::score(42, b));
/// ```
pub fn score(key: u64, backend: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for byte in key.to_le_bytes().iter().chain(&backend.to_le_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fmix64(hash)
}

/// Indices of `backends` (their keys) ordered by [`score`] for `key`, highest first (ties by
/// index).
///
/// Removing a backend leaves the relative order of the others unchanged, so only the keys
/// whose first choice it was move.
///
/// ```
/// use garage_plugin_sdk::{candidate_key, hrw};
///
/// let keys = ["rig-a", "rig-b", "rig-c"].map(candidate_key);
/// let order = hrw::rank(7, keys);
/// assert_eq!(order.len(), 3);
///
/// // Without the first choice, the others keep their order.
/// let first = order[0];
/// let rest: Vec<u64> = keys.iter().enumerate().filter(|(i, _)| *i != first).map(|(_, k)| *k).collect();
/// let reranked: Vec<u64> = hrw::rank(7, rest.iter().copied()).into_iter().map(|i| rest[i]).collect();
/// let expected: Vec<u64> = order[1..].iter().map(|&i| keys[i]).collect();
/// assert_eq!(reranked, expected);
/// ```
pub fn rank(key: u64, backends: impl IntoIterator<Item = u64>) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = backends
        .into_iter()
        .enumerate()
        .map(|(index, backend)| (score(key, backend), index))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, index)| index).collect()
}

/// MurmurHash3's 64-bit finaliser: every input bit flips each output bit with probability 1/2.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_frozen() {
        // Pinned values (computed independently): if these change, every deployed
        // prefix-affinity router sends every prefix somewhere new.
        use crate::candidate_key;
        assert_eq!(candidate_key("rig-a"), 0x778d_a953_57d5_1b97);
        assert_eq!(score(0, candidate_key("")), 0x442a_56f9_22af_9a7c);
        assert_eq!(score(1, candidate_key("rig-a")), 0x333c_6819_9305_29fa);
        assert_eq!(score(1, candidate_key("rig-b")), 0x00ad_36c4_4dde_3d2b);
        assert_eq!(
            score(u64::MAX, candidate_key("rig-a")),
            0xff85_aad7_1edf_6a37
        );
    }

    #[test]
    fn keys_spread_evenly_over_backends() {
        let backends = ["a", "b", "c", "d"].map(crate::candidate_key);
        let mut firsts = [0u32; 4];
        for key in 0..4_000u64 {
            firsts[rank(key.wrapping_mul(0x9e37_79b9_7f4a_7c15), backends)[0]] += 1;
        }
        for count in firsts {
            // Expected 1000 each; 850..1150 is more than 4 standard deviations of slack.
            assert!((850..1150).contains(&count), "{firsts:?}");
        }
    }
}
