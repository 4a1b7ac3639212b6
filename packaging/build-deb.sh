#!/usr/bin/env bash
# Builds the Debian package: target/debian/id06d_<version>_<arch>.deb
#   packaging/build-deb.sh                 # release build, then package
#   packaging/build-deb.sh --binary PATH   # package an existing binary (the tests do this)
#   packaging/build-deb.sh --out DIR       # where to put the .deb (default target/debian)
#   packaging/build-deb.sh --version V     # another version than Cargo.toml's (upgrade tests)
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
out="target/debian"
version=""
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    *) echo "usage: packaging/build-deb.sh [--binary PATH] [--out DIR] [--version V]" >&2; exit 2 ;;
  esac
done
if [[ -z $binary ]]; then
  cargo build -q --release -p id06d
  binary=target/release/id06d
fi
[[ -x $binary ]] || { echo "build-deb: $binary is not an executable" >&2; exit 1; }
[[ -n $version ]] || version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/id06d_${version}_${arch}"

install -D -m 0755 "$binary" "$root/usr/bin/id06d"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/id06d"
install -D -m 0644 systemd/id06d.service "$root/lib/systemd/system/id06d.service"
# No secrets in it (the MQTT password lives in its own file, see password_file).
install -D -m 0644 systemd/id06d.toml "$root/etc/id06d/id06d.toml"
install -D -m 0644 README.md "$root/usr/share/doc/id06d/README.md"
# The contract, the payload schemas and the broker examples the README points to.
install -D -m 0644 docs/contract.md "$root/usr/share/doc/id06d/contract.md"
install -D -m 0644 protocol/asyncapi.yaml "$root/usr/share/doc/id06d/asyncapi.yaml"
for f in protocol/schemas/*.json; do
  install -D -m 0644 "$f" "$root/usr/share/doc/id06d/schemas/$(basename "$f")"
done
install -D -m 0644 docs/mosquitto/acl.conf "$root/usr/share/doc/id06d/examples/mosquitto-acl.conf"
install -D -m 0644 docs/mosquitto/site-broker.conf "$root/usr/share/doc/id06d/examples/mosquitto-site-broker.conf"
install -d -m 0755 "$root/usr/share/man/man8"
gzip -9n < packaging/id06d.8 > "$root/usr/share/man/man8/id06d.8.gz"
chmod 0644 "$root/usr/share/man/man8/id06d.8.gz"
cat > "$root/usr/share/doc/id06d/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: id06d
Source: https://github.com/id06d/id06d

Files: *
Copyright: 2026 id06d developers
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
{
  echo "id06d (${version}) unstable; urgency=medium"
  echo
  echo "  * Release ${version}; see /usr/share/doc/id06d/README.md."
  echo
  echo " -- id06d developers <dev@id06d.se>  $(LC_ALL=C date -u -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$root/usr/share/doc/id06d/changelog.gz"
chmod 0644 "$root/usr/share/doc/id06d/copyright" "$root/usr/share/doc/id06d/changelog.gz"
install -d -m 0755 "$root/DEBIAN"

# Shared libraries the binary needs, as Debian package dependencies.
deps=$(objdump -p "$binary" | awk '/NEEDED/ {print $2}' | while read -r lib; do
  path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
  [[ -n $path ]] || continue
  # Merged /usr: dpkg knows one of the two spellings.
  { dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null || true; } | cut -d: -f1 | head -n1
done | sort -u | paste -sd, | sed 's/,/, /g' || true)

cat > "$root/DEBIAN/control" <<CONTROL
Package: id06d
Version: ${version}
Architecture: ${arch}
Maintainer: id06d developers <dev@id06d.se>
Depends: ${deps:-libc6}, adduser, init-system-helpers (>= 1.54~)
Recommends: mosquitto, pcscd
Section: net
Priority: optional
Description: ID06 card gateway: readers to the personnel ledger over MQTT
 Reads ID06 cards from PC/SC and serial readers, turns detections into
 one tap per presentation, decides locally from a cached blocklist,
 records every tap durably and delivers it over MQTT, at least once and
 in order.
CONTROL
echo "/etc/id06d/id06d.toml" > "$root/DEBIAN/conffiles"
# Maintainer scripts. The service is enabled at installation and started once
# /etc/id06d/id06d.toml passes check-config (as shipped it lacks site_id and terminal_id);
# an upgrade restarts it; removal stops it; /var/lib/id06d (recorded taps, the outbox) is
# kept on removal, and on purge too while it holds events the ledger has not got.
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
config=/etc/id06d/id06d.toml
if [ "$1" = configure ]; then
  if ! getent passwd id06d >/dev/null; then
    adduser --system --group --home /var/lib/id06d --no-create-home --quiet id06d
  fi
  adduser --quiet id06d dialout >/dev/null 2>&1 || true
  chgrp id06d "$config"
  # A note left by an earlier removal is out of date now.
  rm -f /var/lib/id06d/UNDELIVERED.txt
  # Enabled at boot, unless an administrator disabled it before (was-enabled remembers).
  if deb-systemd-helper --quiet was-enabled id06d.service; then
    deb-systemd-helper enable id06d.service >/dev/null || true
  else
    deb-systemd-helper update-state id06d.service >/dev/null || true
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
  fi
  if problem=$(id06d check-config --config "$config" 2>&1 >/dev/null); then
    if [ -d /run/systemd/system ]; then
      if [ -n "$2" ]; then
        deb-systemd-invoke restart id06d.service >/dev/null || true
      else
        deb-systemd-invoke start id06d.service >/dev/null || true
      fi
    fi
  else
    echo "id06d: installed and enabled, but not started: $config is not complete yet:"
    echo "  $problem"
    echo "id06d: set site_id, terminal_id, [mqtt] and the readers, check with"
    echo "  id06d check-config"
    echo "then start it with"
    echo "  systemctl start id06d"
  fi
fi
exit 0
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ]; then
  if [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop id06d.service >/dev/null || true
  fi
  # What the data directory still holds that the ledger has not got, said now and noted
  # for a purge (which runs when this program is gone).
  data=/var/lib/id06d
  if [ -d "$data/db" ]; then
    if stats=$(id06d outbox stats --config /etc/id06d/id06d.toml 2>&1); then
      waiting=$(echo "$stats" | sed -n 's/^outbox depth: *\([0-9][0-9]*\).*/\1/p')
      unconfirmed=$(echo "$stats" | sed -n 's/.* \([0-9][0-9]*\) events not confirmed.*/\1/p')
      if [ "${waiting:-0}" -gt 0 ] || [ "${unconfirmed:-0}" -gt 0 ]; then
        echo "${waiting:-0} recorded taps not delivered to the broker and ${unconfirmed:-0} not confirmed by the ledger (id06d outbox stats, $(date -u +%Y-%m-%dT%H:%M:%SZ))." > "$data/UNDELIVERED.txt"
      else
        rm -f "$data/UNDELIVERED.txt"
      fi
    else
      echo "The outbox could not be checked at removal: $stats" > "$data/UNDELIVERED.txt"
    fi
    if [ -f "$data/UNDELIVERED.txt" ]; then
      echo "id06d: WARNING: $(cat "$data/UNDELIVERED.txt")"
      echo "id06d: they stay in $data; reinstall id06d to deliver them, or export them first: id06d events export --since 2020-01-01"
    fi
  fi
fi
exit 0
PRERM
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
data=/var/lib/id06d
if [ "$1" = purge ]; then
  deb-systemd-helper purge id06d.service >/dev/null || true
  deb-systemd-helper unmask id06d.service >/dev/null || true
  if [ -f "$data/UNDELIVERED.txt" ]; then
    echo "id06d: WARNING: $data is NOT deleted: $(cat "$data/UNDELIVERED.txt")"
    echo "id06d: delete it yourself once the ledger has them (rm -rf $data)."
  else
    rm -rf "$data"
  fi
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
fi
exit 0
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
mkdir -p "$out"
dpkg-deb --build --root-owner-group "$root" "$out/" >/dev/null
echo "$out/id06d_${version}_${arch}.deb"
