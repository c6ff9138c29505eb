//! The gateway a rig talks to: one URL (a single gateway, or replicas behind a load balancer), or
//! the URLs of several replicas sharing one store, any of which accepts the rig's credential.
//!
//! The tunnel lives on one replica at a time. Heartbeats, batch work and deregistration go to
//! that replica first and fall over to the others when it cannot be reached: every replica
//! accepts them (a heartbeat taken elsewhere is relayed to the tunnel's replica through the
//! store).
//!
//! Each rig walks the replicas in an order of its own, by rendezvous hashing of its id with each
//! URL: rigs spread evenly over the replicas, and the rigs of a replica that goes away spread
//! evenly over the others instead of all landing on its neighbour in the list.

use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GatewaysError {
    #[error("no gateway URL")]
    Empty,
    #[error("an entry of the gateway list {0:?} is empty")]
    EmptyEntry(String),
    #[error("the gateway list names {0:?} twice")]
    Duplicate(String),
}

/// The replicas of one gateway, in one rig's order of preference, and which one holds its
/// tunnel.
pub struct Gateways {
    /// Base URLs without a trailing slash; never empty.
    urls: Vec<String>,
    /// Index in `urls` of the replica that holds (or last held) the tunnel.
    tunnel: watch::Sender<usize>,
}

/// A base URL as the rig uses it: no surrounding blanks, no trailing slash.
pub fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_owned()
}

/// Splits `https://a,https://b` (the form of `NODE_RUNNER_GATEWAY_URL`, of `--gateway` and of
/// [`crate::agent::AgentOptions::gateway_url`]) into normalized URLs; empty entries stay, for
/// the validation to name.
pub fn split_list(list: &str) -> Vec<String> {
    list.split(',').map(normalize).collect()
}

impl Gateways {
    /// `urls` in the order of preference of the rig `seed` names (its node id; its name before
    /// it has one). Refuses an empty list, an empty URL and a URL given twice.
    pub fn new(urls: &[String], seed: &str) -> Result<Gateways, GatewaysError> {
        let mut normalized: Vec<String> = Vec::with_capacity(urls.len());
        for url in urls {
            let url = normalize(url);
            if url.is_empty() {
                return Err(GatewaysError::EmptyEntry(urls.join(",")));
            }
            if normalized.contains(&url) {
                return Err(GatewaysError::Duplicate(url));
            }
            normalized.push(url);
        }
        if normalized.is_empty() {
            return Err(GatewaysError::Empty);
        }
        // Highest weight first; the URL breaks a tie, so the order never depends on the input's.
        normalized.sort_by(|a, b| {
            rendezvous_weight(seed, b)
                .cmp(&rendezvous_weight(seed, a))
                .then_with(|| a.cmp(b))
        });
        Ok(Gateways {
            urls: normalized,
            tunnel: watch::Sender::new(0),
        })
    }

    /// [`Gateways::new`] over a comma-separated list.
    pub fn parse(list: &str, seed: &str) -> Result<Gateways, GatewaysError> {
        Self::new(&split_list(list), seed)
    }

    /// Every URL, in this rig's order of preference.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// How many replicas (at least one).
    pub(crate) fn len(&self) -> usize {
        self.urls.len()
    }

    /// The URL at `index` of the order of preference, wrapping around.
    pub fn url(&self, index: usize) -> &str {
        &self.urls[index % self.urls.len()]
    }

    /// Index of the replica that holds (or last held) the tunnel.
    pub fn tunnel_index(&self) -> usize {
        *self.tunnel.borrow()
    }

    /// The replica that holds (or last held) the tunnel; the first preference before any did.
    pub fn tunnel_url(&self) -> &str {
        self.url(self.tunnel_index())
    }

    /// Records that the tunnel is now on the replica at `index`.
    pub(crate) fn set_tunnel(&self, index: usize) {
        self.tunnel.send_if_modified(|current| {
            let index = index % self.urls.len();
            let moved = *current != index;
            *current = index;
            moved
        });
    }

    /// Changes when the tunnel moves to another replica.
    pub(crate) fn watch_tunnel(&self) -> watch::Receiver<usize> {
        self.tunnel.subscribe()
    }

    /// The tunnel's replica, then the others in order of preference after it.
    pub fn failover_order(&self) -> impl Iterator<Item = &str> {
        let first = self.tunnel_index();
        (0..self.urls.len()).map(move |k| self.url(first + k))
    }

    /// Sends the request `request` makes for a base URL to the tunnel's replica; when that one
    /// cannot be reached (or a proxy in front of it says it is down), to the next, and so on.
    /// The first replica that gives an answer, and its answer; else the last error.
    ///
    /// `request` must set a timeout: a replica that died with its host never answers.
    pub(crate) async fn send(
        &self,
        request: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<(&str, reqwest::Response), reqwest::Error> {
        let mut others = self.failover_order().skip(1);
        let mut base = self.tunnel_url();
        loop {
            let next = others.next();
            let result = request(base).send().await;
            let Some(next) = next else {
                return result.map(|response| (base, response));
            };
            match result {
                Ok(response) if !replica_unavailable(response.status()) => {
                    return Ok((base, response));
                }
                Ok(response) => {
                    tracing::debug!(
                        gateway = base,
                        status = response.status().as_u16(),
                        "gateway replica unavailable; trying the next"
                    )
                }
                Err(err) => {
                    tracing::debug!(gateway = base, error = %err, "gateway replica unreachable; trying the next")
                }
            }
            base = next;
        }
    }
}

/// What a load balancer or proxy answers for a replica behind it that is down.
fn replica_unavailable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// The weight of `url` for the rig `seed`: FNV-1a over both, then a 64-bit finalizer so that
/// URLs differing in one digit (ports) get unrelated weights. Written out rather than taken from
/// `std`, whose hasher may change between Rust releases: a rig keeps its order across upgrades.
fn rendezvous_weight(seed: &str, url: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for byte in seed.bytes().chain([0]).chain(url.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    // MurmurHash3's fmix64.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| u.to_string()).collect()
    }

    const THREE: &[&str] = &[
        "https://a.example",
        "https://b.example",
        "https://c.example",
    ];

    #[test]
    fn lists_are_normalized_and_checked() {
        let gateways = Gateways::parse(" https://a.example/ ,https://b.example", "rig").unwrap();
        let mut got = gateways.urls().to_vec();
        got.sort();
        assert_eq!(got, ["https://a.example", "https://b.example"]);
        assert_eq!(
            Gateways::parse("https://a.example,", "rig").err(),
            Some(GatewaysError::EmptyEntry("https://a.example,".into()))
        );
        assert_eq!(
            Gateways::parse("https://a.example,https://a.example/", "rig").err(),
            Some(GatewaysError::Duplicate("https://a.example".into()))
        );
        assert_eq!(Gateways::new(&[], "rig").err(), Some(GatewaysError::Empty));
        assert_eq!(
            Gateways::parse("https://gw.example/", "rig")
                .unwrap()
                .urls(),
            ["https://gw.example"]
        );
    }

    #[test]
    fn the_order_is_the_rigs_own_whatever_the_list_order() {
        let forward = Gateways::new(&urls(THREE), "node-1").unwrap();
        let mut reversed = urls(THREE);
        reversed.reverse();
        let backward = Gateways::new(&reversed, "node-1").unwrap();
        assert_eq!(forward.urls(), backward.urls());
        // Another rig, (most likely) another order; the same rig, always the same one.
        let orders: std::collections::HashSet<Vec<String>> = (0..50)
            .map(|i| {
                Gateways::new(&urls(THREE), &format!("node-{i}"))
                    .unwrap()
                    .urls()
                    .to_vec()
            })
            .collect();
        assert_eq!(
            orders.len(),
            6,
            "50 rigs should use every order of 3 replicas"
        );
        assert_eq!(
            Gateways::new(&urls(THREE), "node-1").unwrap().urls(),
            forward.urls()
        );
    }

    /// Rigs spread over the replicas, and a replica's rigs spread over the others when it goes.
    #[test]
    fn rigs_spread_over_replicas_and_over_the_survivors() {
        let rigs = 3000;
        let mut first = std::collections::HashMap::<String, usize>::new();
        let mut after_a = std::collections::HashMap::<String, usize>::new();
        for i in 0..rigs {
            let gateways = Gateways::new(&urls(THREE), &format!("{i:08x}-node")).unwrap();
            *first.entry(gateways.url(0).to_owned()).or_default() += 1;
            if gateways.url(0) == "https://a.example" {
                *after_a.entry(gateways.url(1).to_owned()).or_default() += 1;
            }
        }
        for url in THREE {
            let share = first[*url] as f64 / rigs as f64;
            assert!((0.28..0.39).contains(&share), "{url}: {share}");
        }
        let moved: usize = after_a.values().sum();
        for url in ["https://b.example", "https://c.example"] {
            let share = after_a[url] as f64 / moved as f64;
            assert!((0.42..0.58).contains(&share), "{url}: {share}");
        }
    }

    #[test]
    fn failover_starts_at_the_tunnel_and_wraps_around() {
        let gateways = Gateways::new(&urls(THREE), "node-1").unwrap();
        let order: Vec<String> = gateways.urls().to_vec();
        assert_eq!(gateways.tunnel_url(), order[0]);
        let mut watch = gateways.watch_tunnel();
        gateways.set_tunnel(2);
        assert!(watch.has_changed().unwrap());
        watch.mark_unchanged();
        gateways.set_tunnel(5);
        assert!(!watch.has_changed().unwrap(), "5 wraps to 2: not a move");
        assert_eq!(gateways.tunnel_url(), order[2]);
        assert_eq!(
            gateways.failover_order().collect::<Vec<_>>(),
            [&order[2], &order[0], &order[1]]
        );
    }

    /// Real HTTP: an unreachable replica and one behind a proxy that says it is down are
    /// skipped; the first that answers is used, whatever its status.
    #[tokio::test]
    async fn send_falls_over_to_the_next_replica() {
        use axum::routing::post;
        async fn serve(router: axum::Router) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await });
            url
        }
        let down = serve(axum::Router::new().route(
            "/x",
            post(|| async { (http::StatusCode::BAD_GATEWAY, "proxy: down") }),
        ))
        .await;
        let refusing = serve(axum::Router::new().route(
            "/x",
            post(|| async { (http::StatusCode::UNAUTHORIZED, "who?") }),
        ))
        .await;
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let http = crate::agent::http_client();
        let post = |base: &str| {
            http.post(format!("{base}/x"))
                .timeout(std::time::Duration::from_secs(5))
        };

        let list = [closed.clone(), down.clone(), refusing.clone()];
        let gateways = Gateways::new(&list, "rig").unwrap();
        let index = |url: &str| gateways.urls().iter().position(|u| u == url).unwrap();
        for start in [&closed, &down] {
            gateways.set_tunnel(index(start));
            let (answered, response) = gateways.send(post).await.unwrap();
            assert_eq!(
                (answered, response.status().as_u16()),
                (refusing.as_str(), 401),
                "from {start}"
            );
        }
        // Only unreachable replicas: the last error.
        let gateways = Gateways::new(std::slice::from_ref(&closed), "rig").unwrap();
        assert!(gateways.send(post).await.is_err());
        // Only a replica that is down: its answer.
        let gateways = Gateways::new(std::slice::from_ref(&down), "rig").unwrap();
        assert_eq!(gateways.send(post).await.unwrap().1.status(), 502);
    }
}
