//! A small catalogue of models `node-runner setup` proposes, with the GPU memory each needs, and
//! where one fits on a rig's GPUs.
//!
//! The memory is the model's weights at the precision its repository publishes, plus room for
//! vLLM's KV cache and activations (about a fifth on top, and at least 2 GiB): a guide to what
//! will load and serve a few requests at a useful context length, not a promise. An owner who
//! wants another model names it with `--model` and the catalogue is not consulted.

use garage_node_protocol::GpuStats;

/// One model of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CatalogueModel {
    /// The Hugging Face repository, which is also the name the gateway routes by.
    pub id: &'static str,
    /// A few words for the list setup prints.
    pub about: &'static str,
    /// GPU memory needed in total, GiB (the engine's GPUs together).
    pub needs_gib: u32,
}

/// The simulated engine's model, proposed where the rig has no NVIDIA GPU (a trial rig).
pub const SIMULATED_MODEL: &str = "sim-llama-3-8b";

/// Largest first: setup proposes the biggest model that fits by default.
pub const CATALOGUE: &[CatalogueModel] = &[
    CatalogueModel {
        id: "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8",
        about: "80B mixture of experts, FP8: four 24 GiB GPUs or more (an engine group across rigs)",
        needs_gib: 96,
    },
    CatalogueModel {
        id: "meta-llama/Llama-3.3-70B-Instruct",
        about: "70B dense, BF16",
        needs_gib: 160,
    },
    CatalogueModel {
        id: "Qwen/Qwen3-32B",
        about: "32B dense, BF16",
        needs_gib: 76,
    },
    CatalogueModel {
        id: "Qwen/Qwen3-30B-A3B",
        about: "30B mixture of experts, BF16: fast for its size",
        needs_gib: 72,
    },
    CatalogueModel {
        id: "Qwen/Qwen3-14B",
        about: "14B dense, BF16",
        needs_gib: 36,
    },
    CatalogueModel {
        id: "Qwen/Qwen3-8B",
        about: "8B dense, BF16",
        needs_gib: 20,
    },
    CatalogueModel {
        id: "meta-llama/Llama-3.1-8B-Instruct",
        about: "8B dense, BF16 (gated: needs an HF_TOKEN)",
        needs_gib: 20,
    },
    CatalogueModel {
        id: "meta-llama/Llama-3.2-3B-Instruct",
        about: "3B dense, BF16 (gated: needs an HF_TOKEN)",
        needs_gib: 10,
    },
    CatalogueModel {
        id: "Qwen/Qwen3-0.6B",
        about: "0.6B dense, BF16: a smoke test",
        needs_gib: 4,
    },
];

/// vLLM takes this share of each GPU's memory by default (`--gpu-memory-utilization 0.9`).
const USABLE_SHARE: f64 = 0.9;

/// The model of the catalogue named `id`.
pub fn find(id: &str) -> Option<&'static CatalogueModel> {
    CATALOGUE.iter().find(|model| model.id == id)
}

/// The GPUs (indexes) an engine of `needs_gib` takes on a rig with `gpus`: the fewest, counted
/// in powers of two (tensor parallelism splits attention heads evenly, and every model here has
/// a power-of-two count of them), from GPU 0 up. `None` when all of them together are too small.
pub fn placement(needs_gib: u32, gpus: &[GpuStats]) -> Option<Vec<u32>> {
    let mut count = 1;
    while count <= gpus.len() {
        let chosen = &gpus[..count];
        // Tensor parallelism puts an equal share on each GPU: the smallest one sets the pace.
        let smallest = chosen.iter().map(|g| g.memory_total_bytes).min()?;
        let usable_gib = smallest as f64 * USABLE_SHARE * count as f64 / f64::from(1 << 30);
        if usable_gib >= f64::from(needs_gib) {
            return Some(chosen.iter().map(|g| g.index).collect());
        }
        count *= 2;
    }
    None
}

/// The catalogue's models that fit on `gpus`, with their GPUs, largest first.
pub fn fitting(gpus: &[GpuStats]) -> Vec<(&'static CatalogueModel, Vec<u32>)> {
    let mut fits: Vec<_> = CATALOGUE
        .iter()
        .filter_map(|model| placement(model.needs_gib, gpus).map(|place| (model, place)))
        .collect();
    fits.sort_by_key(|(model, _)| std::cmp::Reverse(model.needs_gib));
    fits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(gib: &[u64]) -> Vec<GpuStats> {
        gib.iter()
            .enumerate()
            .map(|(i, gib)| GpuStats {
                index: i as u32,
                name: "NVIDIA GeForce RTX 4090".into(),
                memory_total_bytes: gib << 30,
                ..GpuStats::default()
            })
            .collect()
    }

    #[test]
    fn the_fewest_gpus_in_powers_of_two() {
        let rig = gpus(&[24, 24, 24]);
        assert_eq!(placement(10, &rig), Some(vec![0]));
        // 21.6 GiB usable per card: 22 needs two.
        assert_eq!(placement(22, &rig), Some(vec![0, 1]));
        assert_eq!(placement(36, &rig), Some(vec![0, 1]));
        // Three cards are not a tensor-parallel size; four are missing.
        assert_eq!(placement(50, &rig), None);
        assert_eq!(placement(1, &[]), None);
        // The smallest card of the set sets the share.
        assert_eq!(placement(30, &gpus(&[24, 12])), None);
    }

    #[test]
    fn fitting_models_are_proposed_largest_first() {
        let two_4090s = fitting(&gpus(&[24, 24]));
        assert_eq!(two_4090s[0].0.id, "Qwen/Qwen3-14B");
        assert_eq!(two_4090s[0].1, [0, 1]);
        assert!(two_4090s.iter().all(|(m, _)| m.needs_gib <= 43));
        assert!(fitting(&[]).is_empty());
        assert!(
            CATALOGUE
                .iter()
                .all(|m| find(m.id) == Some(m) && m.needs_gib > 0)
        );
    }
}
