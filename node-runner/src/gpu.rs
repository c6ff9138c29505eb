//! The rig's GPUs, read through NVML for heartbeats.
//!
//! NVML ships with the NVIDIA driver; where it is missing (no GPU, another vendor, a container
//! without the driver mounted) the rig reports no GPUs and still serves, e.g. simulated engines.

use garage_node_protocol::GpuStats;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;

/// A handle on NVML, or nothing where it could not be loaded.
pub struct Gpus {
    nvml: Option<Nvml>,
}

impl Gpus {
    /// Loads NVML. Failing that, logs one line and reports no GPUs from then on.
    pub fn init() -> Gpus {
        match Nvml::init() {
            Ok(nvml) => {
                match nvml.device_count() {
                    Ok(count) => tracing::info!(gpus = count, "NVML ready"),
                    Err(error) => tracing::warn!(%error, "NVML loaded but cannot count GPUs"),
                }
                Gpus { nvml: Some(nvml) }
            }
            Err(error) => {
                tracing::warn!(%error, "NVML not available: {error}; reporting no GPUs");
                Gpus { nvml: None }
            }
        }
    }

    /// Reports no GPUs without touching NVML (simulated rigs, tests).
    pub fn disabled() -> Gpus {
        Gpus { nvml: None }
    }

    /// Whether NVML was loaded.
    pub fn available(&self) -> bool {
        self.nvml.is_some()
    }

    /// Reads every GPU. A field a device cannot report (consumer cards lack some) stays at its
    /// default; a device that cannot be opened is skipped. These calls are synchronous but take
    /// microseconds to a few milliseconds.
    pub fn read(&self) -> Vec<GpuStats> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => {
                tracing::debug!(%error, "NVML cannot count GPUs");
                return Vec::new();
            }
        };
        (0..count)
            .filter_map(|index| match nvml.device_by_index(index) {
                Ok(device) => Some((index, device)),
                Err(error) => {
                    tracing::debug!(gpu = index, %error, "NVML cannot open GPU; skipping it");
                    None
                }
            })
            .map(|(index, device)| {
                let field = |what: &'static str| {
                    move |error: NvmlError| {
                        tracing::debug!(gpu = index, %error, "NVML cannot read the GPU's {what}");
                    }
                };
                let mut stats = GpuStats {
                    index,
                    ..GpuStats::default()
                };
                if let Ok(name) = device.name().map_err(field("name")) {
                    stats.name = name;
                }
                if let Ok(uuid) = device.uuid().map_err(field("uuid")) {
                    stats.uuid = uuid;
                }
                if let Ok(memory) = device.memory_info().map_err(field("memory")) {
                    stats.memory_total_bytes = memory.total;
                    stats.memory_used_bytes = memory.used;
                }
                if let Ok(utilization) = device.utilization_rates().map_err(field("utilization")) {
                    stats.utilization_percent = utilization.gpu;
                }
                if let Ok(celsius) = device
                    .temperature(TemperatureSensor::Gpu)
                    .map_err(field("temperature"))
                {
                    stats.temperature_celsius = celsius;
                }
                if let Ok(milliwatts) = device.power_usage().map_err(field("power draw")) {
                    stats.power_watts = f64::from(milliwatts) / 1000.0;
                }
                stats
            })
            .collect()
    }
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpus")
            .field("available", &self.available())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs anywhere: without NVML (this CI) no GPUs and no panic; with it, every GPU has the
    /// identity fields a heartbeat needs.
    #[test]
    fn init_and_read_never_panic() {
        let gpus = Gpus::init();
        let stats = gpus.read();
        if gpus.available() {
            for gpu in &stats {
                assert!(!gpu.name.is_empty() && !gpu.uuid.is_empty(), "{gpu:?}");
                assert!(gpu.memory_used_bytes <= gpu.memory_total_bytes, "{gpu:?}");
            }
        } else {
            assert!(stats.is_empty());
        }
        assert!(Gpus::disabled().read().is_empty());
    }
}
