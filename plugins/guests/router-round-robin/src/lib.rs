//! Default router: round robin over the candidates, one turn counter per model in the
//! gateway's key-value store, so every replica takes its turn from the same sequence.
//!
//! Config: none. State: `rr:<model>`, a counter that only grows.

use garage_plugin_sdk::{Candidates, Host, RouteRequest, Router};

/// Starts each request one candidate further along, then tries the others in order.
pub struct RoundRobin;

impl Router for RoundRobin {
    fn route(
        host: &dyn Host,
        request: &RouteRequest,
        candidates: &Candidates,
    ) -> Result<Vec<u32>, String> {
        let count = candidates.len() as i64;
        if count == 0 {
            return Ok(Vec::new());
        }
        let turn = host.kv_incr(&format!("rr:{}", request.model), 1, None);
        let start = (turn - 1).rem_euclid(count);
        Ok((0..count).map(|i| ((start + i) % count) as u32).collect())
    }
}

garage_plugin_sdk::export_router!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::Candidate;
    use garage_plugin_sdk::testing::MemoryHost;

    fn request(model: &str) -> RouteRequest {
        RouteRequest {
            model: model.into(),
            ..RouteRequest::default()
        }
    }

    #[test]
    fn each_request_starts_one_further_and_lists_everyone() {
        let host = MemoryHost::new();
        let three = Candidates::from([
            Candidate::new("a"),
            Candidate::new("b"),
            Candidate::new("c"),
        ]);
        let firsts: Vec<Vec<u32>> = (0..4)
            .map(|_| RoundRobin::route(&host, &request("m"), &three).unwrap())
            .collect();
        assert_eq!(
            firsts,
            vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]
        );
    }

    #[test]
    fn models_take_turns_independently() {
        let host = MemoryHost::new();
        let two = Candidates::from([Candidate::new("a"), Candidate::new("b")]);
        assert_eq!(
            RoundRobin::route(&host, &request("x"), &two),
            Ok(vec![0, 1])
        );
        assert_eq!(
            RoundRobin::route(&host, &request("y"), &two),
            Ok(vec![0, 1])
        );
        assert_eq!(
            RoundRobin::route(&host, &request("x"), &two),
            Ok(vec![1, 0])
        );
        assert_eq!(host.counter("rr:x"), Some(2));
    }

    #[test]
    fn no_candidates_means_an_empty_order_and_no_state() {
        let host = MemoryHost::new();
        assert_eq!(
            RoundRobin::route(&host, &request("m"), &Candidates::default()),
            Ok(vec![])
        );
        assert!(host.keys().is_empty());
    }
}
