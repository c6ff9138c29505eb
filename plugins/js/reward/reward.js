// componentize-js's entry module (build.mjs bundles it): the reward world of policy.js.
import './policy.js';

export { onUsage, onReport } from '@garage/policy/worlds/reward';
