#!/bin/bash
# tests/packages/run.sh [BUILD_DIR]: the Debian and RPM packages, built and
# installed for real.  Run by .ci/run (as root, on Debian 12), never by
# `make check`: it installs system packages, and purges them again.
#
#   make deb (dpkg-buildpackage from `make dist`'s tarball), lintian with no
#   error or warning, `apt-get install ./p11agent_*.deb`, then the provider
#   and PKCS#11 packages; every file where it belongs, owned by the right
#   package, naming installed paths; the user socket enabled for every user
#   and nothing started; `openssl list -providers` with the shipped snippet
#   (as OPENSSL_CONF and included from openssl.cnf), `p11agent setup
#   openssl` and `p11agent exec`; with the installed agent on a SoftHSM2
#   token, p11-kit and `p11tool --list-tokens` see the token through the
#   front-end module; t_provider_tls and t_user_manager (the user units
#   under a real systemd user manager) against the installed files;
#   `dpkg --purge` leaves nothing behind under /etc, /usr
#   and /var/lib/systemd; `make rpm` (rpmbuild --nodeps on Debian) and
#   filelist.sh: the RPMs ship the same files as the .debs.
#
# BUILD_DIR: a configured tree (default: the source tree, configured here
# when it is not).  Refuses to run when p11agent packages are installed
# already (it would purge them).  TAP lines, then "N passed, N failed".
set -u
src=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$src}
case $build in /*) ;; *) build=$(pwd)/$build ;; esac
if [ "$(id -u)" -ne 0 ]; then
	echo "run.sh: installs packages: run it as root"
	echo "0 passed, 1 failed"
	exit 1
fi
if [ "${P11AGENT_SKIP_DEPS:-0}" != 1 ] && ! "$src/tests/install-deps.sh" pkg; then
	echo "installing the packaging tools failed"
	echo "0 passed, 1 failed"
	exit 1
fi
if [ ! -f "$build/Makefile" ]; then
	if ! { [ -x "$src/configure" ] || (cd "$src" && ./autogen.sh); } >/dev/null 2>&1 ||
		! mkdir -p "$build" || ! (cd "$build" && "$src/configure") >/dev/null 2>&1; then
		echo "configure failed"; echo "0 passed, 1 failed"; exit 1
	fi
fi

top_srcdir=$src top_builddir=$build
export top_srcdir top_builddir
# shellcheck source=tests/integration/lib.sh
. "$src/tests/integration/lib.sh"
# The installed programs, not the build tree's (start_agent, p11a).
# shellcheck disable=SC2034
P11AGENTD=/usr/bin/p11agentd
# shellcheck disable=SC2034
P11AGENT=/usr/bin/p11agent
PKGS="p11agent-pkcs11 p11agent-provider p11agent"
DEBS=$build/deb-build
export DEBIAN_FRONTEND=noninteractive

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
we_installed=no
purge_ours() {
	# shellcheck disable=SC2086 # one word per package
	dpkg --purge $PKGS >"$T/purge.log" 2>&1
}
# Packages this run installed go again, whatever happened.
pkg_cleanup() {
	if [ "$we_installed" = yes ]; then
		purge_ours || { echo "# dpkg --purge failed:"; sed "s/^/#   /" "$T/purge.log"; } >&2
	fi
}
# shellcheck disable=SC2154 # st is set by the trap itself
trap 'st=$?; pkg_cleanup; (exit $st); cleanup' EXIT

# summary_and_done: the closing line .ci/run counts, then the TAP plan.
summary_and_done() {
	echo "$((test_num - fail_count)) passed, $fail_count failed"
	done_testing
}

# snapshot FILE: every path under /etc, /usr and /var/lib/systemd.
snapshot() {
	find /etc /usr /var/lib/systemd -xdev -print 2>/dev/null | sort >"$1"
}

for p in $PKGS; do
	if pkg_installed "$p"; then
		bail_out "package $p is installed on this machine already; remove it first (this test purges what it installs)"
	fi
done

# ---------------------------------------------------------------- build
check "make deb: dpkg-buildpackage builds the packages from make dist's tarball" make -C "$build" deb
cp "$T/check.out" "$T/deb.log"
file_has "$T/deb.log" "lintian deb-build/" "make deb ran lintian"
check "lintian: no error and no warning (each one fixed or overridden with a reason)" \
	lintian --fail-on error,warning "$DEBS"/p11agent_*.changes
deb() { ls "$DEBS/$1"_*.deb 2>/dev/null | head -n 1; }
for p in $PKGS; do
	[ -n "$(deb "$p")" ] || bail_out "make deb made ${p}_*.deb"
done

# ---------------------------------------------------------------- install
snapshot "$T/before"
we_installed=yes
check "apt-get install ./p11agent_*.deb" \
	sh -c 'cd "$1" && apt-get install -y -q --no-install-recommends ./"$(basename "$2")"' sh "$DEBS" "$(deb p11agent)"
check "apt-get install ./p11agent-provider_*.deb ./p11agent-pkcs11_*.deb" \
	sh -c 'cd "$1" && apt-get install -y -q --no-install-recommends ./"$(basename "$2")" ./"$(basename "$3")"' \
	sh "$DEBS" "$(deb p11agent-provider)" "$(deb p11agent-pkcs11)"

multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
modulesdir=$(pkg-config --variable=modulesdir libcrypto)
p11kit_configs=$(pkg-config --variable=p11_module_configs p11-kit-1)
provider=$modulesdir/p11agent.so
pkcs11=/usr/lib/$multiarch/pkcs11/p11agent-pkcs11.so
modfile=$p11kit_configs/p11agent-pkcs11.module
snippet=/etc/ssl/p11agent-openssl.cnf
while read -r pkg path; do
	owner=$(dpkg-query -S "$path" 2>/dev/null | cut -d: -f1)
	if [ -f "$path" ] && [ "$owner" = "$pkg" ]; then
		ok "$path installed by $pkg"
	else
		not_ok "$path installed by $pkg"
		diag "exists: $([ -e "$path" ] && echo yes || echo no); owner: ${owner:-none}"
	fi
done <<EOF2
p11agent /usr/bin/p11agentd
p11agent /usr/bin/p11agent
p11agent /usr/share/man/man1/p11agent.1.gz
p11agent /usr/share/man/man8/p11agentd.8.gz
p11agent /usr/share/man/man5/p11agentd.conf.5.gz
p11agent /usr/lib/systemd/user/p11agentd.service
p11agent /usr/lib/systemd/user/p11agentd.socket
p11agent /usr/lib/environment.d/50-p11agent.conf
p11agent-provider $provider
p11agent-provider $snippet
p11agent-provider /usr/share/man/man7/p11agent-provider.7.gz
p11agent-pkcs11 $pkcs11
p11agent-pkcs11 $modfile
EOF2
# shellcheck disable=SC2086
is "$(dpkg-query -L $PKGS | grep -c '\.la$')" 0 "no libtool .la file in the packages"
file_has "$modfile" "module: $pkcs11" "the p11-kit module file names the module by its installed path"
file_has "$snippet" "module = $provider" "the OpenSSL snippet names the provider by its installed path"
file_has /usr/lib/systemd/user/p11agentd.service "ExecStart=/usr/bin/p11agentd" \
	"the user service runs the installed agent"
run zcat /usr/share/man/man7/p11agent-provider.7.gz
file_has "$T/stdout" ".include $snippet" "p11agent-provider(7) names the installed snippet"
is "$(dpkg-query -W -f='${Conffiles}' p11agent-provider | awk '{ print $1 }' | tr -d '\n')" "$snippet" \
	"the snippet is a conffile"

# Enabled for every user (deb-systemd-helper --user), started for nobody.
run systemctl --global is-enabled p11agentd.socket
is "$(cat "$T/stdout")" enabled "p11agentd.socket is enabled for every user"
agents=
for e in /proc/[0-9]*/exe; do
	[ "$(readlink "$e" 2>/dev/null)" != /usr/bin/p11agentd ] || agents="$agents ${e%/exe}"
done
is "$agents" "" "installing started no agent"

# ---------------------------------------------------------------- OpenSSL
run env -u OPENSSL_MODULES OPENSSL_CONF="$snippet" openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "openssl list -providers with OPENSSL_CONF=$snippet shows p11agent"
stdout_has "OpenSSL Default Provider" "... and the default provider"
sys_cnf="$(openssl version -d | sed -n 's/^OPENSSLDIR: "\(.*\)"$/\1/p')/openssl.cnf"
{ cat "$sys_cnf"; printf '.include %s\n' "$snippet"; } >"$T/openssl.cnf"
run env -u OPENSSL_MODULES OPENSSL_CONF="$T/openssl.cnf" openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "openssl list -providers with the snippet included from openssl.cnf shows p11agent"
run env -u OPENSSL_CONF p11agent setup openssl
rc_is 0 "p11agent setup openssl: the installed snippet loads the installed provider"
stdout_has "    .include $snippet" "p11agent setup openssl prints the .include line"
run env -u OPENSSL_CONF -u OPENSSL_MODULES p11agent exec -- openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "p11agent exec loads the installed provider"

# ---------------------------------------------------------------- PKCS#11 through p11-kit
make_token
if start_agent; then ok "the installed p11agentd runs on a SoftHSM2 token"; else bail_out "the installed p11agentd runs on a SoftHSM2 token"; fi
check "the installed p11agent unlocks it" unlock_token
# The clients see an empty SoftHSM2 store: the token they see is the agent's.
mkdir -p "$T/empty-tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$T/empty-tokens" \
	>"$T/empty-softhsm2.conf"
client() { env SOFTHSM2_CONF="$T/empty-softhsm2.conf" P11AGENT_SOCK="$SOCK" "$@"; }
run client p11-kit list-modules
awk '/^[^ ]/ { m = $1 } m == "p11agent-pkcs11:" && $1 == "token:" { print $2 }' "$T/stdout" >"$T/pk-tokens"
file_has "$T/pk-tokens" "$TOKEN_LABEL" "p11-kit lists the agent's token under the packaged module p11agent-pkcs11"
run client p11tool --list-tokens
stdout_has "token=$TOKEN_LABEL" "p11tool --list-tokens sees the agent's token"
run client p11tool --test-sign "pkcs11:token=$TOKEN_LABEL;object=ec256"
rc_is 0 "p11tool --test-sign with a key of the agent, through the packaged module"
stop_agent

# ---------------------------------------------------------------- suite tests, installed
# installed_test NAME MIN [ENV...]: tests/integration/NAME.sh once more with
# the installed programs (P11A_INSTALLED=/usr) instead of the build tree's;
# ok when it passes with at least MIN checks.
installed_test() {
	local name=$1 min=$2 pass fail
	shift 2
	run env P11A_INSTALLED=/usr "$@" bash "$src/tests/integration/$name.sh"
	pass=$(awk '/^ok / && !/# SKIP/ { n++ } END { print n + 0 }' "$T/stdout")
	fail=$(awk '/^not ok / { n++ } END { print n + 0 }' "$T/stdout")
	diag "$name against the installed packages: $pass ok, $fail not ok"
	if [ "$rc" -eq 0 ] && [ "$fail" -eq 0 ] && [ "$pass" -ge "$min" ]; then
		ok "$name passes against the installed packages ($pass checks)"
	else
		not_ok "$name passes against the installed packages"
		grep '^not ok\|^Bail out\|^1\.\.0' "$T/stdout" | head -n 10 | sed 's/^/#   /'
		diag_file "$T/stderr" 10
	fi
}
# The TLS tests with the installed agent, CLI, provider and snippet.
installed_test t_provider_tls 100 P11A_INSTALLED_SNIPPET="$snippet"
# The installed user units under a real systemd user manager: enabled for
# every user, socket activation, the sandbox, environment.d.
installed_test t_user_manager 30

# ---------------------------------------------------------------- purge
# shellcheck disable=SC2086
check "dpkg --purge $PKGS" dpkg --purge $PKGS
we_installed=no
snapshot "$T/after"
if diff "$T/before" "$T/after" >"$T/left"; then
	ok "dpkg --purge leaves nothing behind (/etc, /usr, /var/lib/systemd as before the install)"
else
	not_ok "dpkg --purge leaves nothing behind (/etc, /usr, /var/lib/systemd as before the install)"
	diag_file "$T/left" 20
fi

# ---------------------------------------------------------------- RPM
check "make rpm: rpmbuild builds the RPMs from make dist's tarball (--nodeps on Debian)" \
	make -C "$build" rpm RPMBUILD_FLAGS=--nodeps
check "the RPMs ship the same files as the Debian packages (filelist.sh)" \
	"$src/tests/packages/filelist.sh" "$DEBS" "$build/rpm-build"
cat "$T/check.out"

summary_and_done
