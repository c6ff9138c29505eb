//! The `docker` driver: vLLM in a container, through the Docker Engine API (bollard). Podman's
//! Docker-compatible socket serves the same API: point `docker_host` at it.
//!
//! One container per engine, named `garage-<engine>`, with the engine's GPUs pinned through an
//! NVIDIA device request and its port published on 127.0.0.1 only. No Docker restart policy:
//! the supervisor restarts it, and two restarters would fight.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt as _;
use tokio::task::JoinHandle;

use super::{EngineError, output};
use crate::config::{DockerDriver, EngineConfig};

/// Where the vLLM image keeps the Hugging Face cache (it runs as root, `HF_HOME` unset).
pub const CONTAINER_CACHE_DIR: &str = "/root/.cache/huggingface";

/// `/dev/shm` of an engine's container unless configured. PyTorch passes tensors between vLLM's
/// processes through shared memory, and Docker's 64 MiB default makes multi-GPU engines crash
/// at load. It is a tmpfs ceiling, not a reservation: pages exist only once written. 8 GiB
/// covers tensor parallelism across a consumer rig's GPUs. (`--ipc=host`, the other fix vLLM's
/// docs give, would share the host's IPC namespace with the container: more than it needs.)
pub const DEFAULT_SHM_SIZE_BYTES: i64 = 8 << 30;

/// Label on every container node-runner creates, with the engine's name.
pub const ENGINE_LABEL: &str = "garage.engine";

/// Time allowed on top of the stop grace for the Docker daemon to answer a stop request.
const STOP_REQUEST_SLACK: Duration = Duration::from_secs(30);

/// The container's name: `garage-<engine>`.
pub fn container_name(engine: &EngineConfig) -> String {
    format!("garage-{}", engine.name)
}

/// The create-container body for `engine`. Pure, so it is tested without a Docker daemon.
///
/// `Cmd` holds `vllm serve` arguments: the official `vllm/vllm-openai` image's entrypoint is
/// `vllm serve` (older tags: `python3 -m vllm.entrypoints.openai.api_server`; both take the
/// same flags, and `--model` works with both where a positional model works only with the
/// former). An engine pinned to several GPUs gets `--tensor-parallel-size` (see
/// [`super::vllm::tensor_parallel_args`]).
pub fn container_spec(engine: &EngineConfig, docker: &DockerDriver) -> ContainerCreateBody {
    let port = engine.port.to_string();
    let port_key = format!("{port}/tcp");
    let mut cmd = Vec::with_capacity(8 + engine.models.len() + docker.args.len());
    if let Some(first) = engine.models.first() {
        cmd.extend(["--model".to_owned(), first.clone()]);
    }
    // Requests name a model as the gateway knows it; vLLM answers to every served name.
    cmd.push("--served-model-name".to_owned());
    cmd.extend(engine.models.iter().cloned());
    // 0.0.0.0 inside the container's own network namespace: the published port (127.0.0.1 on
    // the host) arrives on the container's interface, not its loopback.
    cmd.extend([
        "--port".to_owned(),
        port.clone(),
        "--host".to_owned(),
        "0.0.0.0".to_owned(),
    ]);
    cmd.extend(docker.args.iter().cloned());
    // Several pinned GPUs: the model is split across them unless the owner said otherwise.
    cmd.extend(super::vllm::tensor_parallel_args(
        &engine.gpus,
        &docker.args,
    ));

    let mut env: Vec<String> = docker.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !docker.env.contains_key("HF_HOME") {
        // Pins the cache to the mounted directory even if an image changes its default user.
        env.push(format!("HF_HOME={CONTAINER_CACHE_DIR}"));
    }

    let device_request = DeviceRequest {
        driver: Some("nvidia".to_owned()),
        // No pinned GPUs means all of them, as `docker run --gpus all`.
        count: engine.gpus.is_empty().then_some(-1),
        device_ids: (!engine.gpus.is_empty())
            .then(|| engine.gpus.iter().map(u32::to_string).collect()),
        capabilities: Some(vec![vec!["gpu".to_owned()]]),
        options: None,
    };

    ContainerCreateBody {
        image: Some(docker.image.clone()),
        cmd: Some(cmd),
        env: Some(env),
        exposed_ports: Some(vec![port_key.clone()]),
        labels: Some(HashMap::from([
            (ENGINE_LABEL.to_owned(), engine.name.clone()),
            ("garage.managed-by".to_owned(), "node-runner".to_owned()),
        ])),
        host_config: Some(HostConfig {
            device_requests: Some(vec![device_request]),
            // Published on loopback only: requests reach the engine through node-runner's
            // tunnel, never from the rig's LAN. A bridge network rather than the host's keeps
            // the engine off every other host port.
            port_bindings: Some(HashMap::from([(
                port_key,
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".to_owned()),
                    host_port: Some(port),
                }]),
            )])),
            binds: docker
                .model_cache
                .as_ref()
                .map(|dir| vec![format!("{dir}:{CONTAINER_CACHE_DIR}")]),
            shm_size: Some(docker.shm_size_bytes.unwrap_or(DEFAULT_SHM_SIZE_BYTES)),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

/// Connects to the Docker daemon (once, lazily) and starts containers.
pub(crate) struct DockerLauncher {
    driver: DockerDriver,
    docker: Option<Docker>,
}

impl DockerLauncher {
    pub(crate) fn new(driver: &DockerDriver) -> DockerLauncher {
        DockerLauncher {
            driver: driver.clone(),
            docker: None,
        }
    }

    /// The connection, after agreeing on an API version: the daemon may be older than bollard
    /// (it refuses requests from a newer client) and Podman reports its own.
    async fn docker(&mut self) -> Result<Docker, EngineError> {
        if let Some(docker) = &self.docker {
            return Ok(docker.clone());
        }
        let host = self
            .driver
            .docker_host
            .clone()
            .unwrap_or_else(|| "the default (DOCKER_HOST or the local socket)".to_owned());
        let connect_error = |source| EngineError::DockerConnect {
            host: host.clone(),
            source,
        };
        let docker = match &self.driver.docker_host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(connect_error)?
        .negotiate_version()
        .await
        .map_err(connect_error)?;
        self.docker = Some(docker.clone());
        Ok(docker)
    }

    /// Removes a stale container of the same name, creates the engine's (pulling its image if
    /// missing), starts it and follows its logs.
    pub(crate) async fn start(
        &mut self,
        engine: &EngineConfig,
    ) -> Result<DockerEngine, EngineError> {
        let docker = self.docker().await?;
        let container = container_name(engine);
        remove(&docker, &container).await?;
        let spec = container_spec(engine, &self.driver);
        let options = CreateContainerOptionsBuilder::default()
            .name(&container)
            .build();
        match docker
            .create_container(Some(options.clone()), spec.clone())
            .await
        {
            Ok(_) => {}
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                pull(&docker, &engine.name, &self.driver.image).await?;
                docker
                    .create_container(Some(options), spec)
                    .await
                    .map_err(docker_error("create container"))?;
            }
            Err(error) => return Err(docker_error("create container")(error)),
        }
        docker
            .start_container(&container, None)
            .await
            .map_err(docker_error("start container"))?;
        let logs = tokio::spawn(follow_logs(
            docker.clone(),
            engine.name.clone(),
            container.clone(),
        ));
        Ok(DockerEngine {
            docker,
            engine: engine.name.clone(),
            container,
            port: engine.port,
            logs,
            removed: false,
        })
    }

    /// Removes the engine's container if a start left one behind.
    pub(crate) async fn remove_leftover(&mut self, engine: &EngineConfig) {
        let Some(docker) = self.docker.clone() else {
            return;
        };
        if let Err(error) = remove(&docker, &container_name(engine)).await {
            tracing::warn!(engine = %engine.name, %error, "cannot remove the engine's container");
        }
    }
}

/// A started engine container.
pub(crate) struct DockerEngine {
    docker: Docker,
    engine: String,
    container: String,
    port: u16,
    logs: JoinHandle<()>,
    removed: bool,
}

impl DockerEngine {
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `Some(how)` once the container no longer runs. An unanswered inspect is `None`: a busy
    /// daemon is no reason to restart a model; the health check decides.
    pub(crate) async fn exited(&mut self) -> Option<String> {
        if self.removed {
            return Some("removed".to_owned());
        }
        match self.docker.inspect_container(&self.container, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                if state.running == Some(true) {
                    return None;
                }
                Some(match (state.exit_code, state.oom_killed) {
                    (_, Some(true)) => "killed: out of memory".to_owned(),
                    (Some(code), _) => format!("exit code {code}"),
                    (None, _) => "not running".to_owned(),
                })
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Some("the container is gone".to_owned()),
            Err(error) => {
                tracing::debug!(engine = %self.engine, %error, "cannot inspect the engine's container");
                None
            }
        }
    }

    /// Stops the container (SIGTERM, SIGKILL after `grace`, done by the daemon), then removes it.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if self.removed {
            return;
        }
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        // The daemon answers a stop only once the container is down: allow for the grace.
        let docker = self
            .docker
            .clone()
            .with_timeout(grace.saturating_add(STOP_REQUEST_SLACK));
        match docker.stop_container(&self.container, Some(options)).await {
            // 304: already stopped; 404: already gone.
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => {}
            Err(error) => {
                tracing::warn!(engine = %self.engine, %error, "cannot stop the engine's container; removing it by force");
            }
        }
        match remove(&self.docker, &self.container).await {
            Ok(()) => self.removed = true,
            Err(error) => {
                tracing::warn!(engine = %self.engine, %error, "cannot remove the engine's container");
            }
        }
        // The log stream ends with the container; a removed one may leave it hanging.
        self.logs.abort();
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        self.logs.abort();
    }
}

/// Force-removes a container; a missing one is fine.
async fn remove(docker: &Docker, container: &str) -> Result<(), EngineError> {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(container, Some(options)).await {
        Ok(())
        | Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(error) => Err(docker_error("remove container")(error)),
    }
}

/// Pulls `image`. Without a tag the daemon would pull every tag of the repository, so an
/// untagged name means `latest`, as `docker pull` does.
async fn pull(docker: &Docker, engine: &str, image: &str) -> Result<(), EngineError> {
    let last_segment = image.rsplit('/').next().unwrap_or(image);
    let tagged = image.contains('@') || last_segment.contains(':');
    let mut options = CreateImageOptionsBuilder::default().from_image(image);
    if !tagged {
        options = options.tag("latest");
    }
    tracing::info!(
        engine,
        image,
        "pulling the engine's image (vLLM's is several GB: minutes)"
    );
    let mut progress = docker.create_image(Some(options.build()), None, None);
    while let Some(item) = progress.next().await {
        let info = item.map_err(docker_error("pull image"))?;
        if let Some(detail) = info.error_detail {
            let message = detail.message.unwrap_or_default();
            return Err(EngineError::Docker {
                action: "pull image",
                source: BollardError::DockerStreamError { error: message },
            });
        }
        if let Some(status) = info.status {
            tracing::debug!(engine, image, status, "pulling");
        }
    }
    tracing::info!(engine, image, "image pulled");
    Ok(())
}

/// Forwards the container's output into node-runner's log until the container ends.
async fn follow_logs(docker: Docker, engine: String, container: String) {
    let options = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build();
    let mut logs = docker.logs(&container, Some(options));
    while let Some(item) = logs.next().await {
        let (stream, message) = match item {
            Ok(LogOutput::StdOut { message }) => ("stdout", message),
            Ok(LogOutput::StdErr { message }) => ("stderr", message),
            Ok(LogOutput::StdIn { .. } | LogOutput::Console { .. }) => continue,
            Err(error) => {
                tracing::debug!(engine = %engine, %error, "engine log stream ended");
                return;
            }
        };
        for line in message.split(|b| *b == b'\n') {
            output::log_line(&engine, stream, line);
        }
    }
}

fn docker_error(action: &'static str) -> impl Fn(BollardError) -> EngineError {
    move |source| EngineError::Docker { action, source }
}
