"""The component's entry (componentize-py's `componentize app`): the policy, then the world."""
import policy  # noqa: F401 - registers the meter functions
from garage_policy.worlds.meter import WitWorld  # noqa: F401 - what componentize-py exports
