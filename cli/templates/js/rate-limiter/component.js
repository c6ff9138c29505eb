// The component's entry (build.mjs bundles it): the policy, then the rate-limiter world's exports.
import './policy.js';

export { admit, settle } from '@garage/policy/worlds/rate-limiter';
