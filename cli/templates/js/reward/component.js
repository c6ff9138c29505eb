// The component's entry (build.mjs bundles it): the policy, then the reward world's exports.
import './policy.js';

export { onUsage, onReport } from '@garage/policy/worlds/reward';
