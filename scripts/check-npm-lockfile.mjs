// Checks that a package-lock.json is complete: every dependency and optional dependency that a
// locked package declares resolves, the way Node resolves it (its own node_modules, then each
// folder above), to a package in the lockfile.
//
//   node scripts/check-npm-lockfile.mjs DIR/package-lock.json
//
// Why: `npm ci` installs exactly what the lockfile says and refuses a lockfile that misses an
// entry ("Missing: X from lock file"). A lockfile written on a machine whose npm cache held old
// registry metadata can miss the optional platform packages (win32, musl...) that a locked
// version declares; it works for its author and fails for the next person on a fresh machine.
// The declarations of a locked version never change, so a lockfile that passes this check
// keeps installing whatever the registry publishes later.
import { readFileSync } from 'node:fs';
import { dirname } from 'node:path';

const file = process.argv[2];
if (!file) {
  console.error('usage: node scripts/check-npm-lockfile.mjs PATH/package-lock.json');
  process.exit(2);
}
const lock = JSON.parse(readFileSync(file, 'utf8'));
const packages = lock.packages ?? {};

// Where Node would find `name` when required from the package at `path` ('' is the root).
function resolves(path, name) {
  let dir = path;
  for (;;) {
    const candidate = dir === '' ? `node_modules/${name}` : `${dir}/node_modules/${name}`;
    if (candidate in packages) return true;
    if (dir === '') return false;
    const cut = dir.lastIndexOf('/node_modules/');
    dir = cut < 0 ? '' : dir.slice(0, cut);
  }
}

const missing = [];
for (const [path, entry] of Object.entries(packages)) {
  if (entry.link) continue;
  for (const field of ['dependencies', 'optionalDependencies', 'devDependencies']) {
    // Only the root's dev dependencies are installed.
    if (field === 'devDependencies' && path !== '') continue;
    for (const name of Object.keys(entry[field] ?? {})) {
      if (!resolves(path, name)) missing.push(`${path || '(root)'} -> ${name} (${field})`);
    }
  }
}
if (missing.length > 0) {
  console.error(`${file} is incomplete: ${missing.length} declared dependencies are not locked:`);
  for (const line of missing.slice(0, 20)) console.error(`  ${line}`);
  if (missing.length > 20) console.error(`  ... and ${missing.length - 20} more`);
  console.error(
    'Regenerate it with an empty npm cache, so that npm reads the registry as it is today:\n' +
      `  (cd ${dirname(file)} && rm -rf node_modules package-lock.json && ` +
      'npm_config_cache=$(mktemp -d) npm install)',
  );
  process.exit(1);
}
console.log(`${file}: complete (${Object.keys(packages).length - 1} packages)`);
