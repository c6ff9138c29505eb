"""The component's entry (componentize-py's `componentize app`): the policy, then the world."""
import policy  # noqa: F401 - registers the reward functions
from garage_policy.worlds.reward import WitWorld  # noqa: F401 - what componentize-py exports
