"""The component side: one module per world, each defining the `WitWorld` class that
componentize-py exports, over the bindings it generates (`wit_world`, which exists only while
componentize-py builds the component). A component's entry module imports the policy, then
`from garage_policy.worlds.<slot> import WitWorld`."""
