//! Which Redis deployment a store URL names, and how to reach it.
//!
//! - `redis://host:6379/0` (or `rediss://`): one server, as the `redis` crate reads it.
//! - `redis+cluster://[user:password@]host:port[,host:port...]`: a Redis Cluster. The nodes
//!   listed are seeds: any one that answers tells the client the whole cluster. Database 0 only
//!   (a cluster has no other).
//! - `redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db]`: the primary
//!   that Redis Sentinel names `master-name`, found through the sentinels listed (port 26379
//!   when none is given). The credentials are the primary's; the sentinels are reached without
//!   any.
//!
//! The `rediss+` forms ask for TLS to every node, as `rediss://` does.

use redis::{ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use super::super::StoreError;

/// The default port of a Redis server (cluster nodes included).
const REDIS_PORT: u16 = 6379;
/// The default port of a Redis Sentinel.
const SENTINEL_PORT: u16 = 26379;

/// A store URL, parsed.
#[derive(Debug, Clone)]
pub(super) enum Deployment {
    /// One server: the URL as the operator wrote it.
    Single(String),
    /// A Redis Cluster: one `redis://` URL per seed node, each with the credentials.
    Cluster { seeds: Vec<String> },
    /// A primary (and its replicas) watched by Redis Sentinel.
    Sentinel(SentinelTarget),
}

/// Where the sentinels are and what to ask them for.
#[derive(Debug, Clone)]
pub(super) struct SentinelTarget {
    /// One `redis://` URL per sentinel, without credentials.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// The primary's credentials and database.
    pub node: RedisConnectionInfo,
    /// Whether the primary is reached over TLS.
    pub tls: bool,
}

impl Deployment {
    pub(super) fn parse(url: &str) -> Result<Deployment, StoreError> {
        let invalid = |why: &str| StoreError::Backend(format!("store URL: {why}"));
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("expected a redis:// URL"));
        };
        let (data_scheme, kind) = match scheme.split_once('+') {
            None => return Ok(Deployment::Single(url.to_owned())),
            Some((data @ ("redis" | "rediss"), kind @ ("cluster" | "sentinel"))) => (data, kind),
            Some(_) => {
                return Err(invalid(&format!(
                    "unknown scheme {scheme}://: expected redis://, redis+cluster:// or \
                     redis+sentinel:// (rediss for TLS)"
                )));
            }
        };
        if rest.contains(['?', '#']) {
            return Err(invalid(&format!(
                "{scheme}:// URLs take no query or fragment: the nodes, and the path only"
            )));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let default_port = if kind == "cluster" {
            REDIS_PORT
        } else {
            SENTINEL_PORT
        };
        let hosts = hosts
            .split(',')
            .map(|host| with_port(host, default_port))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| invalid(&format!("{scheme}:// lists an empty node: {url:?}")))?;
        let credentials = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let path: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();

        if kind == "cluster" {
            if !matches!(path[..], [] | ["0"]) {
                return Err(invalid(
                    "a redis+cluster:// URL names no database: a Redis Cluster has only database 0",
                ));
            }
            let seeds = hosts
                .iter()
                .map(|host| format!("{data_scheme}://{credentials}{host}"))
                .collect();
            return Ok(Deployment::Cluster { seeds });
        }

        let (master, db) = match path[..] {
            [master] => (master, "0"),
            [master, db] => (master, db),
            _ => {
                return Err(invalid(
                    "a redis+sentinel:// URL ends with the monitored primary's name: \
                     redis+sentinel://host:26379,host:26380/mymaster (then /db if not 0)",
                ));
            }
        };
        // The primary's credentials and database, decoded as the redis crate decodes a URL
        // (percent-encoding included): parse them on the first sentinel's address, keep them,
        // drop the address.
        let node: ConnectionInfo = format!("{data_scheme}://{credentials}{}/{db}", hosts[0])
            .into_connection_info()
            .map_err(|err| invalid(&format!("{scheme}:// credentials or database: {err}")))?;
        let sentinels = hosts
            .iter()
            .map(|host| format!("{data_scheme}://{host}"))
            .collect();
        Ok(Deployment::Sentinel(SentinelTarget {
            sentinels,
            master: master.to_owned(),
            node: node.redis_settings().clone(),
            tls: data_scheme == "rediss",
        }))
    }
}

/// `host` with `port` added when it names none (`[::1]` style IPv6 included); `None` when empty.
fn with_port(host: &str, port: u16) -> Option<String> {
    if host.is_empty() {
        return None;
    }
    let has_port = match host.rsplit_once(']') {
        Some((_, after)) => after.starts_with(':'),
        None => host.contains(':'),
    };
    Some(if has_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> SentinelTarget {
        match Deployment::parse(url).unwrap() {
            Deployment::Sentinel(target) => target,
            other => panic!("not a sentinel deployment: {other:?}"),
        }
    }

    fn seeds(url: &str) -> Vec<String> {
        match Deployment::parse(url).unwrap() {
            Deployment::Cluster { seeds } => seeds,
            other => panic!("not a cluster deployment: {other:?}"),
        }
    }

    #[test]
    fn a_plain_url_is_one_server() {
        for url in ["redis://127.0.0.1:6379/2", "rediss://:pw@db:6380/0"] {
            match Deployment::parse(url).unwrap() {
                Deployment::Single(parsed) => assert_eq!(parsed, url),
                other => panic!("not one server: {other:?}"),
            }
        }
    }

    #[test]
    fn a_cluster_url_lists_seeds_with_their_credentials() {
        assert_eq!(
            seeds("redis+cluster://u:p%40ss@a:7000,b,[::1]:7002/"),
            [
                "redis://u:p%40ss@a:7000",
                "redis://u:p%40ss@b:6379",
                "redis://u:p%40ss@[::1]:7002",
            ]
        );
        assert_eq!(seeds("rediss+cluster://a:7000/0"), ["rediss://a:7000"]);
    }

    #[test]
    fn a_sentinel_url_names_the_primary_and_keeps_credentials_off_the_sentinels() {
        let target = sentinel("redis+sentinel://:s%23cret@s1:26380,s2/mymaster/3");
        assert_eq!(target.sentinels, ["redis://s1:26380", "redis://s2:26379"]);
        assert_eq!(target.master, "mymaster");
        assert_eq!(target.node.password(), Some("s#cret"));
        assert_eq!(target.node.db(), 3);
        assert!(!target.tls);
        let plain = sentinel("redis+sentinel://s1/primary");
        assert_eq!(plain.node.password(), None);
        assert_eq!(plain.node.db(), 0);
    }

    #[test]
    fn malformed_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://s1:26379", "primary's name"),
            ("redis+sentinel://s1:26379/a/1/2", "primary's name"),
            ("redis+cluster://a:7000/2", "only database 0"),
            ("redis+cluster://a:7000,,b:7001", "empty node"),
            ("redis+cluster://a:7000?timeout=1", "no query"),
            ("redis+replicas://a:7000", "unknown scheme"),
            ("localhost:6379", "redis:// URL"),
        ] {
            let err = Deployment::parse(url).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
