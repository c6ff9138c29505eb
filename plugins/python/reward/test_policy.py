"""Unit tests of the reward policy (plain Python, no WebAssembly):

    python3 -m unittest discover -s plugins/python/reward -p 'test_*.py'

The cases mirror the Rust default's tests (plugins/guests/reward).
"""

import json
import unittest

import policy

CONFIG = json.dumps(
    {
        "points_per_1k_tokens": 2.0,
        "model_weights": {"llama-3.1-70b": 8.0},
        "batch_weight": 0.5,
        "points_per_uptime_hour": 10.0,
        "points_per_gpu_hour": 1.0,
    }
)


class ConfigTest(unittest.TestCase):
    def test_defaults_fill_missing_fields(self):
        cfg = policy.parse_config("{}")
        self.assertEqual(cfg, {**policy.DEFAULTS})
        self.assertEqual(policy.parse_config(" "), cfg)

    def test_bad_configs_are_errors(self):
        for text in ["[]", "not json", '{"batch_weight": "1"}', '{"default_weight": -1}',
                     '{"default_weight": true}', '{"default_weight": null}',
                     '{"model_weights": [1]}', '{"model_weights": null}',
                     '{"model_weights": {"m": null}}', '{"model_weight": {}}']:
            with self.subTest(text=text), self.assertRaises(policy.ConfigError) as caught:
                policy.parse_config(text)
            self.assertTrue(str(caught.exception).startswith("invalid plugin config"))

    def test_unknown_field_is_named(self):
        with self.assertRaisesRegex(policy.ConfigError, "unknown field `model_weight`"):
            policy.parse_config('{"model_weight": {}}')


class AwardsTest(unittest.TestCase):
    def setUp(self):
        self.cfg = policy.parse_config(CONFIG)

    def test_tokens_pay_by_model_weight(self):
        self.assertEqual(policy.usage_awards(self.cfg, "alice", "llama-3.1-70b", 300, 200, False),
                         [("alice", 0.5 * 2.0 * 8.0, "tokens")])
        self.assertEqual(policy.usage_awards(self.cfg, "alice", "qwen-7b", 300, 200, False),
                         [("alice", 0.5 * 2.0, "tokens")])

    def test_batch_tokens_pay_the_batch_weight(self):
        self.assertEqual(policy.usage_awards(self.cfg, "alice", "qwen-7b", 1000, 0, True),
                         [("alice", 1.0, "batch-tokens")])

    def test_static_upstreams_and_empty_requests_earn_nothing(self):
        self.assertEqual(policy.usage_awards(self.cfg, "", "qwen-7b", 1000, 1000, False), [])
        self.assertEqual(policy.usage_awards(self.cfg, "alice", "qwen-7b", 0, 0, False), [])

    def test_reports_pay_uptime_capped_at_the_period_and_gpu_hours(self):
        self.assertEqual(policy.report_awards(self.cfg, "alice", 1_800_000, 2_000_000, 7200.0),
                         [("alice", 5.0, "uptime"), ("alice", 2.0, "gpu-hours")])
        self.assertEqual(policy.report_awards(self.cfg, "", 1_800_000, 2_000_000, 7200.0), [])
        self.assertEqual(policy.report_awards(self.cfg, "alice", 0, 0, float("nan")), [])

    def test_defaults_pay_a_point_per_thousand_tokens_and_per_uptime_hour(self):
        cfg = policy.parse_config("{}")
        self.assertEqual(policy.usage_awards(cfg, "alice", "any", 1500, 500, False),
                         [("alice", 2.0, "tokens")])
        self.assertEqual(policy.report_awards(cfg, "alice", 3_600_000, 3_600_000, 3600.0),
                         [("alice", 1.0, "uptime")])


if __name__ == "__main__":
    unittest.main()
