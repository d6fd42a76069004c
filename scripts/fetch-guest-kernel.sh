#!/usr/bin/env bash
# Fetches Debian's newest 6.1 cloud kernel package and unpacks its vmlinux
# (ELF) for the sluice-vmm Linux-guest tests; prints the vmlinux path.
#
#   SLUICE_GUEST_KERNEL=$(scripts/fetch-guest-kernel.sh) cargo test -p sluice-vmm --test linux_guest
#
# Never installs the kernel on the host: `apt-get download` + `dpkg -x`.
set -euo pipefail
dir=${1:-${CARGO_TARGET_DIR:-target}/guest-kernel}
mkdir -p "$dir"
cd "$dir"
if [ ! -s vmlinux ]; then
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | cut -d' ' -f1 | sort -V | tail -1)
  [ -n "$pkg" ] || { echo "no linux-image-6.1.0-*-cloud-amd64 package (run apt-get update)" >&2; exit 1; }
  command -v lz4 >/dev/null || apt-get install -y -qq lz4 >/dev/null
  rm -rf deb x && mkdir deb
  (cd deb && apt-get download "$pkg" >/dev/null 2>&1)
  dpkg -x deb/*.deb x
  vmlinuz=$(ls x/boot/vmlinuz-*)
  # The compressed kernel inside the bzImage: LZ4 legacy frame (Debian 6.1 cloud).
  offset=$(python3 -c "import sys; d=open(sys.argv[1],'rb').read(); print(d.find(bytes([2,0x21,0x4c,0x18])))" "$vmlinuz")
  [ "$offset" -ge 0 ] || { echo "no LZ4 payload in $vmlinuz" >&2; exit 1; }
  tail -c +"$((offset + 1))" "$vmlinuz" | lz4 -dc > vmlinux.tmp 2>/dev/null || true
  head -c 4 vmlinux.tmp | grep -q ELF || { echo "could not unpack $vmlinuz" >&2; exit 1; }
  mv vmlinux.tmp vmlinux
  rm -rf deb x
fi
echo "$PWD/vmlinux"
