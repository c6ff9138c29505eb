//! Measured, not reported, hardware: what a rig says it runs on is checked against how fast it
//! really decodes.
//!
//! Routing never trusts a rig's GPU names: routers see the decode speed and time to first
//! token this gateway measured on the rig's real traffic and checks (`candidate`'s
//! `tokens-per-second` and `latency-ms`). A rig's reported GPUs still matter to people (an
//! operator's console, a rig owner's statement), so the gateway checks them: token decoding is
//! bound by memory bandwidth, so rigs serving the same model decode at speeds roughly in
//! proportion to their GPUs' bandwidth. A rig whose measured speed per unit of reported
//! bandwidth is [`IMPLAUSIBLE_FACTOR`] times below (or above) the median of its peers'
//! (at least [`MIN_PEERS`] other rigs serving one of its models) is flagged `implausible`:
//! its GPUs are likely not what it reports, or are busy with other work.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How far a rig's speed per bandwidth may sit from its peers' median before it is flagged: a
/// factor of 3 leaves room for what legitimately varies (batching, clocks, drivers, PCIe
/// lanes), and still catches a 3060 reported as a 4090 (bandwidth 360 against 1008 GB/s).
pub const IMPLAUSIBLE_FACTOR: f64 = 3.0;

/// Peers needed for a verdict: with one, there is no telling which of two rigs is wrong.
pub const MIN_PEERS: usize = 2;

/// Memory bandwidth of GPUs, GB/s, from their makers' specifications. The more specific name
/// first: `4080 super` before `4080`.
const BANDWIDTH_GBPS: &[(&str, f64)] = &[
    ("rtx 5090", 1792.0),
    ("rtx 5080", 960.0),
    ("rtx 5070 ti", 896.0),
    ("rtx 5070", 672.0),
    ("rtx 4090", 1008.0),
    ("rtx 4080 super", 736.0),
    ("rtx 4080", 717.0),
    ("rtx 4070 ti super", 672.0),
    ("rtx 4070 ti", 504.0),
    ("rtx 4070 super", 504.0),
    ("rtx 4070", 504.0),
    ("rtx 4060 ti", 288.0),
    ("rtx 4060", 272.0),
    ("rtx 3090 ti", 1008.0),
    ("rtx 3090", 936.0),
    ("rtx 3080 ti", 912.0),
    ("rtx 3080", 760.0),
    ("rtx 3070 ti", 608.0),
    ("rtx 3070", 448.0),
    ("rtx 3060 ti", 448.0),
    ("rtx 3060", 360.0),
    ("rtx 6000 ada", 960.0),
    ("rtx a6000", 768.0),
    ("h200", 4800.0),
    ("h100 pcie", 2000.0),
    ("h100", 3350.0),
    ("a100-sxm4-80gb", 2039.0),
    ("a100 80gb", 1935.0),
    ("a100", 1555.0),
    ("l40s", 864.0),
    ("a10", 600.0),
    ("v100", 900.0),
    ("t4", 320.0),
];

/// Memory bandwidth of a GPU by its product name (as NVML gives it), GB/s.
///
/// ```
/// use garage_gateway::nodes::hardware::bandwidth_gbps;
///
/// assert_eq!(bandwidth_gbps("NVIDIA GeForce RTX 4090"), Some(1008.0));
/// assert_eq!(bandwidth_gbps("NVIDIA GeForce RTX 4080 SUPER"), Some(736.0));
/// assert_eq!(bandwidth_gbps("Some Unknown Accelerator"), None);
/// ```
pub fn bandwidth_gbps(name: &str) -> Option<f64> {
    let name = name.to_ascii_lowercase();
    let words: Vec<&str> = name.split_whitespace().collect();
    let normalised = words.join(" ");
    BANDWIDTH_GBPS
        .iter()
        .find(|(model, _)| {
            // Whole words: `a10` is not `a100`, `t4` is not part of another name.
            let model_words: Vec<&str> = model.split(' ').collect();
            words
                .windows(model_words.len())
                .any(|window| window == model_words.as_slice())
                || normalised == *model
        })
        .map(|(_, gbps)| *gbps)
}

/// What the gateway makes of a rig's reported hardware (`GET /admin/nodes/{id}`: `hardware`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Hardware {
    /// GPUs the rig reported in its last heartbeat, by name.
    pub reported_gpus: Vec<String>,
    /// Their summed memory bandwidth, GB/s, where the gateway knows every one of them.
    pub reported_bandwidth_gbps: Option<f64>,
    /// Decode speed this replica measured on the rig's answers (smoothed), tokens per second.
    pub measured_tokens_per_second: Option<f32>,
    /// Time to first token this replica measured (smoothed), milliseconds.
    pub measured_ttft_ms: Option<f32>,
    pub verdict: HardwareVerdict,
    /// Why, when the verdict is `implausible`.
    pub detail: Option<String>,
}

/// Whether a rig's reported GPUs fit its measured speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HardwareVerdict {
    /// Not enough to tell: GPUs unknown or unreported, no measured speed yet, or fewer than
    /// [`MIN_PEERS`] comparable rigs.
    #[default]
    Unknown,
    /// Within [`IMPLAUSIBLE_FACTOR`] of its peers.
    Plausible,
    /// Too slow (or too fast) for what it reports.
    Implausible,
}

/// A rig as the comparison sees it.
pub struct Observed<'a> {
    pub models: &'a [String],
    pub hardware: &'a Hardware,
}

impl Hardware {
    /// Speed per reported bandwidth, when both are known.
    fn efficiency(&self) -> Option<f64> {
        let speed = f64::from(self.measured_tokens_per_second?);
        let bandwidth = self.reported_bandwidth_gbps?;
        (speed > 0.0 && bandwidth > 0.0).then_some(speed / bandwidth)
    }
}

/// The verdict on rig `index` of `rigs`, against the others that serve one of its models.
pub fn judge(rigs: &[Observed<'_>], index: usize) -> (HardwareVerdict, Option<String>) {
    let rig = &rigs[index];
    let Some(own) = rig.hardware.efficiency() else {
        return (HardwareVerdict::Unknown, None);
    };
    let mut peers: Vec<f64> = rigs
        .iter()
        .enumerate()
        .filter(|(i, other)| *i != index && other.models.iter().any(|m| rig.models.contains(m)))
        .filter_map(|(_, other)| other.hardware.efficiency())
        .collect();
    if peers.len() < MIN_PEERS {
        return (HardwareVerdict::Unknown, None);
    }
    peers.sort_by(f64::total_cmp);
    let mid = peers.len() / 2;
    let median = if peers.len().is_multiple_of(2) {
        (peers[mid - 1] + peers[mid]) / 2.0
    } else {
        peers[mid]
    };
    let speed = rig.hardware.measured_tokens_per_second.unwrap_or_default();
    let bandwidth = rig.hardware.reported_bandwidth_gbps.unwrap_or_default();
    let expected = median * bandwidth;
    if own * IMPLAUSIBLE_FACTOR < median {
        (
            HardwareVerdict::Implausible,
            Some(format!(
                "decodes at {speed:.0} tokens/s where rigs serving the same models reach about \
                 {expected:.0} with the {bandwidth:.0} GB/s of memory bandwidth it reports: its \
                 GPUs are likely not what it reports, or busy with other work"
            )),
        )
    } else if own > median * IMPLAUSIBLE_FACTOR {
        (
            HardwareVerdict::Implausible,
            Some(format!(
                "decodes at {speed:.0} tokens/s, faster than the {bandwidth:.0} GB/s of memory \
                 bandwidth it reports allows (rigs serving the same models reach about \
                 {expected:.0})"
            )),
        )
    } else {
        (HardwareVerdict::Plausible, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rig(gpu: &str, speed: f32) -> Hardware {
        Hardware {
            reported_gpus: vec![gpu.to_owned()],
            reported_bandwidth_gbps: bandwidth_gbps(gpu),
            measured_tokens_per_second: Some(speed),
            ..Hardware::default()
        }
    }

    #[test]
    fn names_match_whole_words_most_specific_first() {
        assert_eq!(bandwidth_gbps("NVIDIA GeForce RTX 3090 Ti"), Some(1008.0));
        assert_eq!(bandwidth_gbps("NVIDIA GeForce RTX 3090"), Some(936.0));
        assert_eq!(bandwidth_gbps("NVIDIA A10"), Some(600.0));
        assert_eq!(bandwidth_gbps("NVIDIA A100-SXM4-80GB"), Some(2039.0));
        assert_eq!(bandwidth_gbps("NVIDIA H100 PCIe"), Some(2000.0));
        assert_eq!(bandwidth_gbps(""), None);
    }

    #[test]
    fn a_slow_rig_claiming_a_fast_gpu_is_implausible_its_honest_peers_are_not() {
        let model = vec!["m".to_owned()];
        let hardware = [
            rig("NVIDIA GeForce RTX 4090", 100.0),
            rig("NVIDIA GeForce RTX 3090", 92.0),
            rig("NVIDIA GeForce RTX 3060", 36.0),
            // Claims a 4090, decodes as a 3060 does.
            rig("NVIDIA GeForce RTX 4090", 30.0),
        ];
        let rigs: Vec<Observed<'_>> = hardware
            .iter()
            .map(|hardware| Observed {
                models: &model,
                hardware,
            })
            .collect();
        let verdicts: Vec<HardwareVerdict> = (0..rigs.len()).map(|i| judge(&rigs, i).0).collect();
        assert_eq!(
            verdicts,
            [
                HardwareVerdict::Plausible,
                HardwareVerdict::Plausible,
                HardwareVerdict::Plausible,
                HardwareVerdict::Implausible
            ]
        );
        assert!(judge(&rigs, 3).1.unwrap().contains("not what it reports"));
    }

    #[test]
    fn no_verdict_without_peers_speeds_or_known_gpus() {
        let (a, b) = (vec!["a".to_owned()], vec!["b".to_owned()]);
        let fast = rig("NVIDIA GeForce RTX 4090", 100.0);
        let slow = rig("NVIDIA GeForce RTX 4090", 10.0);
        let unknown = rig("Mystery GPU", 50.0);
        // Two rigs of another model are no peers.
        let rigs = [
            Observed {
                models: &a,
                hardware: &slow,
            },
            Observed {
                models: &b,
                hardware: &fast,
            },
            Observed {
                models: &b,
                hardware: &fast,
            },
            Observed {
                models: &a,
                hardware: &unknown,
            },
        ];
        assert_eq!(judge(&rigs, 0).0, HardwareVerdict::Unknown);
        assert_eq!(judge(&rigs, 3).0, HardwareVerdict::Unknown);
        let unmeasured = Hardware {
            measured_tokens_per_second: None,
            ..fast.clone()
        };
        let rigs = [
            Observed {
                models: &a,
                hardware: &unmeasured,
            },
            Observed {
                models: &a,
                hardware: &fast,
            },
            Observed {
                models: &a,
                hardware: &fast,
            },
        ];
        assert_eq!(judge(&rigs, 0).0, HardwareVerdict::Unknown);
    }
}
