// The component's entry (build.mjs bundles it): the policy, then the meter world's exports.
import './policy.js';

export { quote, charge } from '@garage/policy/worlds/meter';
