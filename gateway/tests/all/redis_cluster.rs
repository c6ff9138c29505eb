//! Gateways on a Redis Cluster of three masters (`redis+cluster://`): keys made on one replica
//! work on another, and a revocation reaches it. The store suite runs on a cluster too
//! (`store_suite::redis_cluster_store`).

use crate::redis_replicas::replicas_on_store_share_keys_and_revocations;
use crate::support::RedisCluster;

#[tokio::test]
async fn replicas_on_a_cluster_share_keys_and_revocations() {
    let cluster = RedisCluster::start(3);
    replicas_on_store_share_keys_and_revocations(&cluster.url()).await;
}
