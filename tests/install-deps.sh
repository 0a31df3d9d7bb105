#!/usr/bin/env bash
# install-deps.sh: the one list of Debian 12 packages p11agent needs.
# demo.sh, tests/run-suite.sh and .ci/run all call it, so the lists cannot
# drift apart.
#
#   tests/install-deps.sh build   build the tree (autotools, compilers, libraries)
#   tests/install-deps.sh demo    build + what demo.sh runs (SoftHSM2, curl)
#   tests/install-deps.sh test    demo + what the test suite uses (systemd: for
#                                 systemd-socket-activate, systemd-analyze and
#                                 t_audit's private systemd-journald and journalctl;
#                                 dbus and python3-dbus: t_logind's private bus;
#                                 pinentry-tty, pinentry-curses, tmux: t_pinentry;
#                                 openssh-server, socat: t_forward's sshd and relay;
#                                 libnss3, swtpm, tpm2-*, pcscd, vpcd: tests/tokens)
#   tests/install-deps.sh pkg     demo + what make deb, make rpm and the
#                                 package test (tests/packages/run.sh) use
#   tests/install-deps.sh ci      test + pkg + valgrind, clang (fuzzers, ASan)
#   --list                        print the packages instead of installing
#
# Installs only what is missing; as non-root it names what is missing and
# exits 1.  Exit 0 when everything is present afterwards.
set -u

build="autoconf automake libtool pkg-config make gcc libc6-dev libssl-dev openssl
	libp11-kit-dev p11-kit libsystemd-dev libjson-c-dev libassuan-dev"
demo="$build softhsm2 opensc python3-pykcs11 util-linux curl ca-certificates"
test="$demo libcmocka-dev python3 python3-cryptography procps gdb nginx-light gnutls-bin fcgiwrap git wget
	libengine-pkcs11-openssl libnss3-tools chromium firefox-esr systemd
	dbus-daemon dbus-bin python3-dbus python3-gi pinentry-tty pinentry-curses tmux
	openssh-server openssh-client socat
	libnss3 libnss3-tools swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools"
# tests/tokens, OpenSC: a virtual CAC card (libcacard-dev, built into vcard_bridge)
# in vsmartcard's vpcd reader behind a private pcscd (iproute2: the lo of its
# netns, and of swtpm's in setup-tpm2.sh).
opensc_token="pcscd vsmartcard-vpcd libcacard-dev iproute2"
# tests/tokens, p11-kit RPC: p11-kit-client.so (p11-kit server is in p11-kit).
opensc_token="$opensc_token p11-kit-modules"
test="$test $opensc_token"
# dpkg-buildpackage checks build-essential too (an implicit build dependency).
pkgtools="build-essential debhelper dpkg-dev fakeroot lintian rpm libsystemd-dev gnutls-bin"
pkg="$demo $pkgtools"
ci="$test $pkgtools valgrind clang libclang-rt-14-dev"

list=0
if [ "${1:-}" = "--list" ]; then list=1; shift; fi
case "${1:-test}" in
build) pkgs=$build ;;
demo) pkgs=$demo ;;
test) pkgs=$test ;;
pkg) pkgs=$pkg ;;
ci) pkgs=$ci ;;
*) echo "usage: $0 [--list] build|demo|test|pkg|ci" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086 # one word per package
set -- $pkgs
if [ "$list" -eq 1 ]; then echo "$@"; exit 0; fi

missing=
for p in "$@"; do
	if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
		missing="$missing $p"
	fi
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps.sh: missing Debian packages:$missing" >&2
	echo "install-deps.sh: run as root, or: sudo apt-get install$missing" >&2
	exit 1
fi
echo "install-deps.sh: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "install-deps.sh: apt-get update failed" >&2; exit 1; }
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null ||
	{ echo "install-deps.sh: apt-get install failed for:$missing" >&2; exit 1; }
