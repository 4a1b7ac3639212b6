#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo   install what is missing, build, run `id06d demo`
#   ./run.sh test   install what is missing, check formatting and lints, run every test
# Meant for a Debian 12 machine as root (or with sudo) that has a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(
  mosquitto mosquitto-clients          # the broker the demo and the tests run privately
  pcscd libpcsclite-dev pkg-config     # PC/SC: the daemon and the pcsc crate
  vsmartcard-vpcd pcsc-tools           # virtual PC/SC readers for the tests
  libudev-dev                          # serial port enumeration (serialport's libudev)
  socat libnfc-bin                     # ptys and libnfc's reference host for the PN532 tests
  systemd binutils lintian             # systemd-analyze for the unit; objdump, strip, lintian for the .deb
  openssl ca-certificates              # certificates made by the TLS tests; the system CA bundle
  faketime                             # events dated in the past for the retention tests
  iproute2 util-linux                  # ip (loopback in the PC/SC test namespaces), prlimit
  chromium                             # the headless browser the commissioning-page tests drive
  gcc git                              # the libosdp crate compiles its C source and asks git for its version
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    [[ $p == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
      command -v sudo >/dev/null || { echo "run.sh: root (or sudo) is needed to install: ${missing[*]}" >&2; exit 1; }
      sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "run.sh: no Rust toolchain found: install Rust (rustup, stable >= 1.85) and try again" >&2
      exit 1
    fi
  fi
  if command -v rustup >/dev/null; then
    for c in rustfmt clippy; do
      rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
    done
  fi
}

case "${1:-}" in
  demo)
    install_packages
    say "building id06d"
    cargo build -q -p id06d
    say "running the demo"
    exec ./target/debug/id06d demo
    ;;
  test)
    install_packages
    say "checking formatting"
    cargo fmt --all -- --check
    say "linting"
    cargo clippy -q --workspace --all-targets -- -D warnings
    say "running the tests (unit, property, integration against real mosquitto, pcscd+vpcd, ptys)"
    cargo test --workspace
    ;;
  *)
    echo "usage: ./run.sh demo | ./run.sh test" >&2
    exit 2
    ;;
esac
