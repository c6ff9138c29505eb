//! One connection type over the three deployments, so the store's commands and scripts are
//! written once: a [`ConnectionManager`] to one server, the redis crate's cluster connection
//! (it follows `MOVED`/`ASK` and the cluster's topology by itself), and [`SentinelConnection`],
//! a connection to whichever server the sentinels name primary.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture, Value,
};

use super::deployment::SentinelTarget;

/// How long connecting to a node may take. On the request path a store outage must turn into a
/// quick 503, not a request that hangs while the client library retries.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may wait for its answer (same reason).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection attempts of one server before a command fails.
const SINGLE_RETRIES: usize = 2;
/// A cluster command is retried after `MOVED`, `ASK`, `TRYAGAIN` or a lost node, within
/// [`CLUSTER_OVERALL_TIMEOUT`]: a slot that moved costs a retry, not an error.
const CLUSTER_RETRIES: u32 = 3;
/// Waits between cluster retries: short, since most are redirects answered at once (the
/// library's default starts above a second).
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 10;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 500;
/// A cluster command's whole time, retries included.
const CLUSTER_OVERALL_TIMEOUT: Duration = Duration::from_secs(4);
/// Asking the sentinels for the primary and connecting to it, all of it.
const SENTINEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to the store's deployment; cheap to clone (clones share the connection).
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

impl Connection {
    /// One server at `url`; fails if it cannot be reached now, later outages are retried.
    pub(super) async fn single(url: &str) -> Result<Connection, RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(SINGLE_RETRIES);
        Ok(Connection::Single(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }
}

/// A connection to a Redis Cluster, found through any of `seeds`.
pub(super) async fn cluster(seeds: &[String]) -> Result<ClusterConnection, RedisError> {
    let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .overall_response_timeout(Some(CLUSTER_OVERALL_TIMEOUT))
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
        .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
        .build()?;
    client.get_async_connection().await
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
            Connection::Sentinel(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
            Connection::Sentinel(conn) => conn.get_db(),
        }
    }
}

/// Connection settings with the store's bounded waits.
pub(super) fn bounded_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// A sentinel client for `target`'s primary.
pub(super) fn sentinel_client(target: &SentinelTarget) -> Result<SentinelClient, RedisError> {
    let mut node =
        SentinelNodeConnectionInfo::default().set_redis_connection_info(target.node.clone());
    if target.tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    SentinelClient::build(
        target.sentinels.clone(),
        target.master.clone(),
        Some(node),
        SentinelServerType::Master,
    )
}

/// A server's `(host, port)`.
pub(super) type Address = (String, u16);

/// The address a client connects to, when it is a TCP one.
pub(super) fn address_of(client: &redis::Client) -> Option<Address> {
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
        ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    }
}

/// The attempt to reach the primary that commands use now: a lookup through the sentinels and
/// a connection to the server they named (with its address), shared by every command that
/// waits for it.
type Attempt =
    Shared<BoxFuture<'static, Result<(MultiplexedConnection, Option<Address>), RedisError>>>;

/// A connection to the primary that Redis Sentinel names. When the primary is lost (see
/// [`primary_lost`]), the command fails at once, like [`ConnectionManager`]'s, and the next one
/// asks the sentinels again: after a failover, that is the promoted replica. A switchover that
/// leaves the old primary running breaks nothing, so the store's event subscriber, which asks
/// the sentinels regularly, tells this connection when they name another primary
/// ([`SentinelConnection::follow`]).
#[derive(Clone)]
pub(super) struct SentinelConnection(Arc<SentinelInner>);

struct SentinelInner {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    config: AsyncConnectionConfig,
    db: i64,
    current: ArcSwap<Attempt>,
}

impl SentinelConnection {
    /// A connection to the primary the sentinels name; fails if none can be reached now.
    pub(super) async fn connect(target: &SentinelTarget) -> Result<SentinelConnection, RedisError> {
        let sentinel = Arc::new(tokio::sync::Mutex::new(sentinel_client(target)?));
        let config = bounded_config();
        let first = attempt(sentinel.clone(), config.clone());
        let conn = SentinelConnection(Arc::new(SentinelInner {
            sentinel,
            config,
            db: target.node.db(),
            current: ArcSwap::from_pointee(first.clone()),
        }));
        first.await?;
        Ok(conn)
    }

    /// The connection commands use now, and the attempt that made it (to replace it if it
    /// turns out broken).
    async fn current(&self) -> (Arc<Attempt>, Result<MultiplexedConnection, RedisError>) {
        let attempt = self.0.current.load_full();
        let conn = (*attempt).clone().await.map(|(conn, _)| conn);
        (attempt, conn)
    }

    /// Puts a fresh lookup in place of `broken`, unless another command already did. It runs
    /// when the next command needs it.
    fn replace(&self, broken: &Arc<Attempt>) {
        let fresh = Arc::new(attempt(self.0.sentinel.clone(), self.0.config.clone()));
        self.0.current.compare_and_swap(broken, fresh);
    }

    /// The sentinels name `primary` now: if commands go elsewhere (a switchover leaves the old
    /// primary running, taking writes that are lost when it becomes a replica), the next one
    /// asks the sentinels again. Called again and again, so a lookup that raced the switch and
    /// found the old primary is corrected at the next call; an attempt still running is left
    /// to finish.
    pub(super) fn follow(&self, primary: &Address) {
        let attempt = self.0.current.load_full();
        if let Some(Ok((_, Some(address)))) = attempt.peek()
            && address != primary
        {
            tracing::warn!(
                from = %format!("{}:{}", address.0, address.1),
                to = %format!("{}:{}", primary.0, primary.1),
                "the sentinels moved the Redis primary; following"
            );
            self.replace(&attempt);
        }
    }

    async fn run<T>(
        &self,
        send: impl AsyncFnOnce(&mut MultiplexedConnection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let (attempt, conn) = self.current().await;
        let mut conn = conn.inspect_err(|_| self.replace(&attempt))?;
        let result = send(&mut conn).await;
        if let Err(err) = &result
            && primary_lost(err)
        {
            tracing::warn!(error = %err, "lost the Redis primary; asking the sentinels again");
            self.replace(&attempt);
        }
        result
    }
}

/// A lookup of the primary through the sentinels, then a connection to it, bounded in time.
fn attempt(
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    config: AsyncConnectionConfig,
) -> Attempt {
    async move {
        let lookup = async {
            // The sentinel client verifies that the server it names calls itself primary.
            let client = sentinel.lock().await.async_get_client().await?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            Ok((conn, address_of(&client)))
        };
        match tokio::time::timeout(SENTINEL_CONNECT_TIMEOUT, lookup).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no Redis primary found through the sentinels in time",
            ))),
        }
    }
    .boxed()
    .shared()
}

/// Whether an error means the connection no longer leads to a working primary: broken, timed
/// out, a server demoted to replica (`READONLY`), or a primary that lost its replicas and
/// refuses writes (`NOREPLICAS`, under `min-replicas-to-write`), as the old primary does once
/// its replica is promoted.
fn primary_lost(err: &RedisError) -> bool {
    err.is_unrecoverable_error()
        || err.is_timeout()
        || err.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || err.code() == Some("NOREPLICAS")
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        async move {
            self.run(async |conn: &mut MultiplexedConnection| conn.send_packed_command(cmd).await)
                .await
        }
        .boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        async move {
            self.run(async |conn: &mut MultiplexedConnection| {
                conn.send_packed_commands(pipeline, offset, count).await
            })
            .await
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        self.0.db
    }
}
