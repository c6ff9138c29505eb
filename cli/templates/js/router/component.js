// The component's entry (build.mjs bundles it): the policy, then the router world's exports.
import './policy.js';

export { route } from '@garage/policy/worlds/router';
