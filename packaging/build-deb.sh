#!/usr/bin/env bash
# Builds the Debian package: target/debian/id06d_<version>_<arch>.deb
#   packaging/build-deb.sh                 # release build, then package
#   packaging/build-deb.sh --binary PATH   # package an existing binary (the tests do this)
#   packaging/build-deb.sh --out DIR       # where to put the .deb (default target/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
out="target/debian"
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: packaging/build-deb.sh [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [[ -z $binary ]]; then
  cargo build -q --release -p id06d
  binary=target/release/id06d
fi
[[ -x $binary ]] || { echo "build-deb: $binary is not an executable" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
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
Depends: ${deps:-libc6}, adduser
Recommends: pcscd
Section: net
Priority: optional
Description: ID06 card gateway: readers to the personnel ledger over MQTT
 Reads ID06 cards from PC/SC and serial readers, turns detections into
 one tap per presentation, decides locally from a cached blocklist,
 records every tap durably and delivers it over MQTT, at least once and
 in order.
CONTROL
echo "/etc/id06d/id06d.toml" > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd id06d >/dev/null; then
    adduser --system --group --home /var/lib/id06d --no-create-home id06d
  fi
  adduser id06d dialout >/dev/null 2>&1 || true
  chgrp id06d /etc/id06d/id06d.toml
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
  fi
fi
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/lib/id06d
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
mkdir -p "$out"
dpkg-deb --build --root-owner-group "$root" "$out/" >/dev/null
echo "$out/id06d_${version}_${arch}.deb"
