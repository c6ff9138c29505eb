//! What `setup` and `doctor` find out about the rig: its GPUs, its container engine and whether
//! containers see the GPUs, the gateway, and the engines' ports.

use std::time::Duration;

use bollard::Docker;
use garage_node_protocol::GpuStats;

use crate::gpu::Gpus;

/// Long enough for a daemon or a gateway across the internet to answer, short enough that a
/// doctor with five failing checks still answers within half a minute.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The rig's GPUs: what NVML reads, or an inventory given on the command line (`--assume-gpus`)
/// for machines without one (tests, a dry run for another rig).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInventory {
    /// Where NVML could be loaded (or an inventory was given).
    pub nvml: bool,
    pub gpus: Vec<GpuStats>,
}

impl GpuInventory {
    /// Reads NVML.
    pub fn detect() -> GpuInventory {
        let gpus = Gpus::init();
        GpuInventory {
            nvml: gpus.available(),
            gpus: gpus.read(),
        }
    }

    /// `none`, or `NAME:GIB` items separated by commas (`NVIDIA GeForce RTX 4090:24,...`),
    /// numbered from 0 in order.
    pub fn parse(spec: &str) -> Result<GpuInventory, String> {
        let spec = spec.trim();
        if spec == "none" {
            return Ok(GpuInventory {
                nvml: false,
                gpus: Vec::new(),
            });
        }
        let gpus = spec
            .split(',')
            .enumerate()
            .map(|(index, item)| {
                let (name, gib) = item.trim().rsplit_once(':').ok_or_else(|| {
                    format!("GPU {item:?}: give its name and memory in GiB as NAME:GIB")
                })?;
                let gib: u64 = gib
                    .trim()
                    .parse()
                    .ok()
                    .filter(|gib| (1..=4096).contains(gib))
                    .ok_or_else(|| {
                        format!("GPU {item:?}: {gib:?} is not a memory size in GiB (1 to 4096)")
                    })?;
                if name.trim().is_empty() {
                    return Err(format!("GPU {item:?}: the name is empty"));
                }
                Ok(GpuStats {
                    index: index as u32,
                    name: name.trim().to_owned(),
                    uuid: format!("GPU-assumed-{index}"),
                    memory_total_bytes: gib << 30,
                    ..GpuStats::default()
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(GpuInventory { nvml: true, gpus })
    }

    /// `2 × NVIDIA GeForce RTX 4090 (24 GiB)`-style summary.
    pub fn describe(&self) -> String {
        if self.gpus.is_empty() {
            return "no NVIDIA GPU".to_owned();
        }
        self.gpus
            .iter()
            .map(|gpu| {
                format!(
                    "{} {} ({} GiB)",
                    gpu.index,
                    gpu.name,
                    gpu.memory_total_bytes >> 30
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What the container engine can do for the rig.
#[derive(Debug, Clone, PartialEq)]
pub enum ContainerEngine {
    /// No answer on its socket.
    Unreachable { host: String, error: String },
    /// It answers, but containers would not see the GPUs.
    NoGpuPassthrough { host: String, runtimes: Vec<String> },
    /// Containers get GPUs, through `how`.
    Ready { host: String, how: String },
}

/// Asks the Docker Engine API at `host` (`unix:///…`, `tcp://…`; by default `DOCKER_HOST` or
/// the local socket) for its version and then `GET /info`: containers see NVIDIA GPUs when the
/// daemon has the `nvidia` runtime (the NVIDIA Container Toolkit) or discovered NVIDIA devices
/// through CDI.
pub async fn container_engine(host: Option<&str>) -> ContainerEngine {
    let shown = host.map_or_else(
        || {
            std::env::var("DOCKER_HOST")
                .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned())
        },
        str::to_owned,
    );
    let unreachable = |error: String| ContainerEngine::Unreachable {
        host: shown.clone(),
        error,
    };
    let docker = match host {
        Some(host) => Docker::connect_with_host(host),
        None => Docker::connect_with_defaults(),
    };
    let docker = match docker {
        Ok(docker) => docker.with_timeout(PROBE_TIMEOUT),
        Err(error) => return unreachable(error.to_string()),
    };
    let docker = match docker.negotiate_version().await {
        Ok(docker) => docker,
        Err(error) => return unreachable(error.to_string()),
    };
    let info = match docker.info().await {
        Ok(info) => info,
        Err(error) => return unreachable(error.to_string()),
    };
    let mut runtimes: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
    runtimes.sort();
    let cdi_gpu = info
        .discovered_devices
        .unwrap_or_default()
        .iter()
        .any(|device| {
            device
                .id
                .as_deref()
                .is_some_and(|id| id.starts_with("nvidia.com/gpu"))
        });
    if runtimes.iter().any(|runtime| runtime == "nvidia") {
        ContainerEngine::Ready {
            host: shown,
            how: "the nvidia runtime".to_owned(),
        }
    } else if cdi_gpu {
        ContainerEngine::Ready {
            host: shown,
            how: "CDI (nvidia.com/gpu devices)".to_owned(),
        }
    } else {
        ContainerEngine::NoGpuPassthrough {
            host: shown,
            runtimes,
        }
    }
}

/// What is on an engine's port on 127.0.0.1.
#[derive(Debug, Clone, PartialEq)]
pub enum PortState {
    /// Nothing listens: the engine can take it.
    Free,
    /// An engine answers `/health` with 200.
    Healthy,
    /// Something answers HTTP on `/health`, with another status.
    Unhealthy { status: u16 },
    /// Something holds the port and answers no HTTP there.
    Taken,
}

/// Tries to bind `port`; where that fails, asks `/health` there.
pub async fn port(port: u16) -> PortState {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        return PortState::Free;
    }
    let answer = crate::agent::http_client()
        .get(format!("http://127.0.0.1:{port}/health"))
        .timeout(PROBE_TIMEOUT)
        .send()
        .await;
    match answer {
        Ok(response) if response.status().is_success() => PortState::Healthy,
        Ok(response) => PortState::Unhealthy {
            status: response.status().as_u16(),
        },
        Err(_) => PortState::Taken,
    }
}

/// Why the gateway could not be asked.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayProblem {
    /// The TLS handshake failed: most often a certificate the rig does not trust.
    Tls(String),
    /// No connection, or no answer in time.
    Unreachable(String),
    /// It answered `/health` with this status.
    Status(u16),
}

/// `GET {base}/health` with the rig's own client.
pub async fn gateway(http: &reqwest::Client, base: &str) -> Result<(), GatewayProblem> {
    match http
        .get(format!("{base}/health"))
        .timeout(PROBE_TIMEOUT)
        .send()
        .await
    {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(GatewayProblem::Status(response.status().as_u16())),
        Err(error) => {
            let text = chain(&error);
            Err(match tls_cause(&error) {
                Some(cause) => GatewayProblem::Tls(cause),
                // hyper-util keeps the connector's error as text alone: read it there.
                None => match text.find("certificate") {
                    Some(at) => GatewayProblem::Tls(
                        text[text[..at].rfind(": ").map_or(0, |colon| colon + 2)..].to_owned(),
                    ),
                    None => GatewayProblem::Unreachable(text),
                },
            })
        }
    }
}

/// The rustls error somewhere in `error`'s causes. rustls hands its errors to hyper inside an
/// `io::Error`, whose `source()` skips the error it wraps, so each `io::Error` is opened too.
fn tls_cause(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(tls.to_string());
        }
        next = error.source();
    }
    None
}

/// An error and its causes on one line.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assumed_inventory_parses_or_says_why_not() {
        let rig = GpuInventory::parse("NVIDIA GeForce RTX 4090:24, NVIDIA RTX A6000:48").unwrap();
        assert_eq!(rig.gpus.len(), 2);
        assert_eq!(rig.gpus[1].index, 1);
        assert_eq!(rig.gpus[1].memory_total_bytes, 48 << 30);
        assert_eq!(
            rig.describe(),
            "0 NVIDIA GeForce RTX 4090 (24 GiB), 1 NVIDIA RTX A6000 (48 GiB)"
        );
        assert!(GpuInventory::parse("none").unwrap().gpus.is_empty());
        for (bad, why) in [
            ("RTX 4090", "NAME:GIB"),
            ("RTX 4090:lots", "not a memory size"),
            ("RTX 4090:0", "not a memory size"),
            (":24", "name is empty"),
            ("", "NAME:GIB"),
        ] {
            let error = GpuInventory::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }
}
