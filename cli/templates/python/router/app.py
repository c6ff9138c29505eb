"""The component's entry (componentize-py's `componentize app`): the policy, then the world."""
import policy  # noqa: F401 - registers the route function
from garage_policy.worlds.router import WitWorld  # noqa: F401 - what componentize-py exports
