//! The `process` driver: the engine is a child process (a `vllm serve` from a virtualenv, the
//! `sim-engine` binary...), in its own process group so that a stop reaches its workers too.

use std::process::{ExitStatus, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getppid};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::{EngineError, output};
use crate::config::{EngineConfig, ProcessDriver};

/// Replaced by the engine's port in the command and in env values.
const PORT_PLACEHOLDER: &str = "{port}";

/// A log line longer than this is forwarded in pieces, so a process that never prints a newline
/// cannot grow node-runner's memory.
const MAX_LOG_LINE_BYTES: u64 = 16 * 1024;

/// After the engine exits, how long its output may take to drain into the log. A grandchild
/// that inherited the pipes and outlived the group would otherwise hold the forwarders open.
const LOG_DRAIN_BOUND: Duration = Duration::from_secs(1);

pub(crate) struct ProcessEngine {
    name: String,
    child: Child,
    pid: u32,
    port: u16,
    exit: Option<ExitStatus>,
    log_forwarders: Vec<JoinHandle<()>>,
}

/// Makes the engine get SIGKILL when node-runner dies, SIGKILL included: otherwise a killed agent
/// leaves its engine running, holding the port and the GPUs' memory, and the agent that
/// restarts cannot start its own. Only the engine process itself gets the signal; workers it
/// forks (vLLM's, one per GPU) see their parent die and are up to the engine.
fn die_with_node_runner(command: &mut Command) {
    let node_runner = Pid::this();
    #[expect(
        unsafe_code,
        reason = "pre_exec runs in the forked child before exec: it makes two async-signal-safe \
                  syscalls (prctl, getppid) and allocates nothing"
    )]
    // SAFETY: the closure only calls prctl(2) and getppid(2) and builds errors from errno
    // values, all async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // node-runner may have died between the fork and the prctl: no signal will come.
            if getppid() != node_runner {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// A command for the spawner thread, and where its result goes.
struct SpawnJob {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: mpsc::SyncSender<std::io::Result<Child>>,
}

/// Spawns from one thread that lives as long as node-runner. The kernel sends the parent-death
/// signal when the *thread* that forked the child exits, not the process: an engine spawned from
/// a runtime thread that later ends (tokio's blocking threads end when idle) would be killed
/// while node-runner runs on.
fn spawn_from_lasting_thread(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let gone = || std::io::Error::other("node-runner's engine-spawner thread is gone");
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, incoming) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("engine-spawner".into())
            .spawn(move || {
                for mut job in incoming {
                    // Tokio's child handling (reaping, kill on drop) needs its runtime.
                    let _runtime = job.runtime.enter();
                    let _ = job.reply.send(job.command.spawn());
                }
            })
            .ok()
            .map(|_| jobs)
    });
    let spawner = spawner.as_ref().ok_or_else(gone)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    let (reply, answer) = mpsc::sync_channel(1);
    spawner
        .send(SpawnJob {
            command,
            runtime,
            reply,
        })
        .map_err(|_| gone())?;
    // A fork and an exec: as brief as the spawn itself would be on this thread.
    answer.recv().map_err(|_| gone())?
}

impl ProcessEngine {
    pub(crate) fn spawn(
        config: &EngineConfig,
        driver: &ProcessDriver,
    ) -> Result<ProcessEngine, EngineError> {
        let port = config.port.to_string();
        let mut args = driver
            .command
            .iter()
            .map(|arg| arg.replace(PORT_PLACEHOLDER, &port));
        let program = args.next().unwrap_or_default();
        // `vllm serve` on several GPUs splits the model across them unless told otherwise.
        let parallel = if super::vllm::is_vllm_serve(&driver.command) {
            super::vllm::tensor_parallel_args(&config.gpus, &driver.command)
        } else {
            Vec::new()
        };
        let mut command = Command::new(&program);
        command
            .args(args.chain(parallel))
            .envs(
                driver
                    .env
                    .iter()
                    .map(|(key, value)| (key, value.replace(PORT_PLACEHOLDER, &port))),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The group is led by the child, so a signal to it reaches every worker the engine
            // spawns (vLLM runs one per GPU); and the terminal's Ctrl-C reaches node-runner
            // alone, which then stops the engines in order.
            .process_group(0)
            .kill_on_drop(true);
        if !config.gpus.is_empty() {
            let gpus: Vec<String> = config.gpus.iter().map(u32::to_string).collect();
            command.env("CUDA_VISIBLE_DEVICES", gpus.join(","));
            // CUDA numbers GPUs fastest first by default; NVML (and so the config and the
            // heartbeats) by PCI bus. On a rig with mixed cards the two orders differ.
            if !driver.env.contains_key("CUDA_DEVICE_ORDER") {
                command.env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
            }
        }
        if !driver.env.contains_key("NO_COLOR") {
            // The output lands in node-runner's log, not on a terminal.
            command.env("NO_COLOR", "1");
        }
        if let Some(workdir) = &driver.workdir {
            command.current_dir(workdir);
        }
        die_with_node_runner(&mut command);
        let spawn_error = |source| EngineError::Spawn {
            program: program.clone(),
            source,
        };
        let mut child = spawn_from_lasting_thread(command).map_err(spawn_error)?;
        let pid = child
            .id()
            .ok_or_else(|| spawn_error(std::io::Error::other("the process exited at once")))?;
        let mut log_forwarders = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            log_forwarders.push(tokio::spawn(forward_lines(
                config.name.clone(),
                "stdout",
                stdout,
            )));
        }
        if let Some(stderr) = child.stderr.take() {
            log_forwarders.push(tokio::spawn(forward_lines(
                config.name.clone(),
                "stderr",
                stderr,
            )));
        }
        Ok(ProcessEngine {
            name: config.name.clone(),
            child,
            pid,
            port: config.port,
            exit: None,
            log_forwarders,
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(exit status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        if self.exit.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.exit = status,
                Err(error) => {
                    tracing::debug!(engine = %self.name, %error, "cannot poll the engine process");
                }
            }
        }
        self.exit.map(|status| status.to_string())
    }

    /// SIGTERM to the process group, SIGKILL after `grace`, then SIGKILL to whatever is left
    /// of the group (workers the engine failed to reap).
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if self.exited().is_none() {
            self.signal(Signal::SIGTERM);
            match tokio::time::timeout(grace, self.child.wait()).await {
                Ok(status) => self.exit = status.ok(),
                Err(_) => {
                    tracing::warn!(
                        engine = %self.name,
                        grace_ms = grace.as_millis() as u64,
                        "engine ignored SIGTERM; killing it"
                    );
                    self.signal(Signal::SIGKILL);
                    self.exit = self.child.wait().await.ok();
                }
            }
        }
        // The group outlives its leader while any member lives, so its id cannot have been
        // reused yet; once empty, this finds nobody (ESRCH).
        self.signal(Signal::SIGKILL);
        for forwarder in &mut self.log_forwarders {
            if tokio::time::timeout(LOG_DRAIN_BOUND, &mut *forwarder)
                .await
                .is_err()
            {
                forwarder.abort();
            }
        }
        self.log_forwarders.clear();
    }

    fn signal(&self, signal: Signal) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        match killpg(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(engine = %self.name, %error, "cannot send {signal} to the engine");
            }
        }
    }
}

/// Forwards each line of `pipe` into node-runner's log until the engine closes it.
async fn forward_lines(engine: String, stream: &'static str, pipe: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LOG_LINE_BYTES)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) => return,
            Ok(_) => output::log_line(&engine, stream, &line),
            Err(error) => {
                tracing::debug!(engine = %engine, stream, %error, "cannot read engine output");
                return;
            }
        }
    }
}
