"""componentize-py's entry module (`componentize app`): the reward world of policy.py."""
import policy  # noqa: F401 - registers the reward functions
from garage_policy.worlds.reward import WitWorld  # noqa: F401 - what componentize-py exports
