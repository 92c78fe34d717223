#!/usr/bin/env bash
# The site check (docs/_ext/check_site.py) drives Debian's chromium; pip cannot install a
# browser, so `make test` installs the package here when it is missing and apt-get can
# (root, or passwordless sudo). Otherwise it says what to install and the check fails.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "installing Debian's chromium for the site check"
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
       $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    exit 0
  fi
fi
echo "chromium is missing and could not be installed: install Debian's chromium package" \
     "(apt-get install chromium); the site check fails without it" >&2
exit 0  # the check itself then fails with its own message (docs/_ext/check_site.py)
