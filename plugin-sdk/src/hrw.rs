//! Rendezvous (highest random weight) hashing: a stable, spread-out preference order of
//! backends for a key, which moves only the keys of a backend that comes or goes.
//!
//! Every gateway replica and every version of a plugin must rank alike, so the hash is fixed
//! here (FNV-1a over the key and the id, then MurmurHash3's 64-bit finaliser for avalanche)
//! and must not change: changing it would move every prefix off the rig whose cache holds it.

/// The weight of backend `id` for `key`: the backend with the highest weight is the key's home.
///
/// ```
/// use garage_plugin_sdk::hrw;
///
/// // Deterministic: the same on every replica and in every build.
/// assert_eq!(hrw::score(42, "rig-a"), hrw::score(42, "rig-a"));
/// assert_ne!(hrw::score(42, "rig-a"), hrw::score(42, "rig-b"));
/// ```
pub fn score(key: u64, id: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for byte in key.to_le_bytes().iter().chain(id.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fmix64(hash)
}

/// Indices of `ids` ordered by [`score`] for `key`, highest first (ties by index).
///
/// Removing a backend leaves the relative order of the others unchanged, so only the keys
/// whose first choice it was move.
///
/// ```
/// use garage_plugin_sdk::hrw;
///
/// let ids = ["rig-a", "rig-b", "rig-c"];
/// let order = hrw::rank(7, ids);
/// assert_eq!(order.len(), 3);
///
/// // Without the first choice, the others keep their order.
/// let first = order[0];
/// let rest: Vec<&str> = ids.iter().enumerate().filter(|(i, _)| *i != first).map(|(_, id)| *id).collect();
/// let reranked: Vec<&str> = hrw::rank(7, rest.iter().copied()).into_iter().map(|i| rest[i]).collect();
/// let expected: Vec<&str> = order[1..].iter().map(|&i| ids[i]).collect();
/// assert_eq!(reranked, expected);
/// ```
pub fn rank<'a>(key: u64, ids: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = ids
        .into_iter()
        .enumerate()
        .map(|(index, id)| (score(key, id), index))
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
        assert_eq!(score(0, ""), 0x7bd3_144f_29c0_cc9e);
        assert_eq!(score(1, "rig-a"), 0x7703_0438_6b1c_cb5f);
        assert_eq!(score(1, "rig-b"), 0x81ff_414b_a786_70da);
        assert_eq!(score(u64::MAX, "rig-a"), 0x06d8_c84b_bce5_cf56);
    }

    #[test]
    fn keys_spread_evenly_over_backends() {
        let ids = ["a", "b", "c", "d"];
        let mut firsts = [0u32; 4];
        for key in 0..4_000u64 {
            firsts[rank(key.wrapping_mul(0x9e37_79b9_7f4a_7c15), ids)[0]] += 1;
        }
        for count in firsts {
            // Expected 1000 each; 850..1150 is more than 4 standard deviations of slack.
            assert!((850..1150).contains(&count), "{firsts:?}");
        }
    }
}
