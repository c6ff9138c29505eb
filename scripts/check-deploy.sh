#!/usr/bin/env bash
# Checks of what is shipped beside the binaries, run by scripts/test.sh. Each part is a script
# of its own under scripts/deploy/, run in order; a failing one stops the test command.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for check in scripts/deploy/*.sh; do
    [[ -e "$check" ]] || continue
    echo "--- $check"
    "$check"
done
