#!/bin/bash
# t_setup_firefox: `p11agent setup firefox-policy` prints the SecurityDevices
# fragment, and with --file or --system merges the module into a
# policies.json: every other policy and device kept, a flat (older) map kept
# flat, a Delete entry of the same name dropped, the file's mode kept,
# --remove undoing it, --dry-run writing nothing, a bad file named with its
# line and left byte for byte as it was.  --system runs in a private mount
# namespace with an overlay over /etc (root only), never on the system's.
# Firefox itself reading the result: t_pkcs11_browser.
set -u
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd "$PYTHON3"
require_agent_binaries
MOD=$top_builddir/.libs/p11agent-pkcs11.so
require_file "$MOD"
MOD_ABS=$(readlink -f "$MOD")
P=$T/policies.json

# jq_is FILE PYEXPR DESC: PYEXPR (over d, the parsed file) is true.
jq_is() {
	check "$3" "$PYTHON3" -c 'import json, sys
d = json.load(open(sys.argv[1]))
assert eval(sys.argv[2]), json.dumps(d)' "$1" "$2"
}

# ---------------------------------------------------------------- print
run "$P11AGENT" setup firefox-policy --module "$MOD"
rc_is 0 "setup firefox-policy prints a fragment"
cp "$T/stdout" "$T/frag.json"
jq_is "$T/frag.json" "d == {'policies': {'SecurityDevices': {'Add': {'p11agent': '$MOD_ABS'}}}}" \
	"the fragment is exactly SecurityDevices.Add.p11agent = the module's absolute path"
run "$P11AGENT" setup firefox-policy --module "$T/nonexistent.so"
rc_is 1 "a missing module is refused"
stderr_has "nonexistent.so" "the error names the module"
run "$P11AGENT" setup firefox-policy --remove
rc_is 2 "--remove without --system or --file is a usage error"
run "$P11AGENT" setup firefox-policy --system --file "$P"
rc_is 2 "--system and --file together are a usage error"
run "$P11AGENT" setup git --file "$P"
rc_is 2 "--file belongs to firefox-policy only"

# ---------------------------------------------------------------- merge into a file
cat >"$P" <<'EOF'
{
  "policies": {
    "DisableTelemetry": true,
    "Certificates": { "ImportEnterpriseRoots": true },
    "SecurityDevices": {
      "Add": { "other": "/usr/lib/other-pkcs11.so" },
      "Delete": [ "p11agent", "legacy" ]
    }
  }
}
EOF
chmod 0640 "$P"
cp "$P" "$T/orig.json"
run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$P" --dry-run
rc_is 0 "--dry-run succeeds"
stdout_has "would write $P" "--dry-run says which file it would write"
check "--dry-run leaves the file byte for byte" cmp "$T/orig.json" "$P"
run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$P"
rc_is 0 "--file merges the module"
stdout_has "Wrote $P" "it says what it wrote"
jq_is "$P" "d['policies']['SecurityDevices']['Add'] == {'other': '/usr/lib/other-pkcs11.so', 'p11agent': '$MOD_ABS'}" \
	"the module is added beside the other device"
jq_is "$P" "d['policies']['SecurityDevices']['Delete'] == ['legacy']" \
	"a Delete entry of the same name is dropped, the others kept"
jq_is "$P" "d['policies']['DisableTelemetry'] is True and d['policies']['Certificates'] == {'ImportEnterpriseRoots': True}" \
	"every other policy is kept"
is "$(stat -c %a "$P")" 640 "the file's mode is kept"
cp "$P" "$T/merged.json"
run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$P"
rc_is 0 "a second run succeeds"
stdout_has "nothing changed" "a second run says nothing changed"
check "a second run leaves the file as it was" cmp "$T/merged.json" "$P"
run "$P11AGENT" setup firefox-policy --name corp-card --module "$MOD" --file "$P"
jq_is "$P" "d['policies']['SecurityDevices']['Add'].get('corp-card') == '$MOD_ABS'" "--name sets the device's name"
run "$P11AGENT" setup firefox-policy --name corp-card --file "$P" --remove
rc_is 0 "--remove succeeds"
run "$P11AGENT" setup firefox-policy --file "$P" --remove
rc_is 0 "--remove of the default name succeeds"
jq_is "$P" "d['policies']['SecurityDevices'] == {'Add': {'other': '/usr/lib/other-pkcs11.so'}, 'Delete': ['legacy']}" \
	"--remove takes out exactly what was added"
run "$P11AGENT" setup firefox-policy --file "$P" --remove
stdout_has "nothing changed" "--remove of an absent device changes nothing"

# The older flat form stays flat (Firefox rejects a mix of both forms).
printf '{"policies": {"SecurityDevices": {"old": "/usr/lib/old.so"}}}\n' >"$P"
run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$P"
rc_is 0 "merging into a flat SecurityDevices map succeeds"
jq_is "$P" "d['policies']['SecurityDevices'] == {'old': '/usr/lib/old.so', 'p11agent': '$MOD_ABS'}" \
	"a flat SecurityDevices map stays flat"
# A new file with its directories.
run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$T/new/dir/policies.json"
rc_is 0 "a missing file is created with its directories"
jq_is "$T/new/dir/policies.json" "d == {'policies': {'SecurityDevices': {'Add': {'p11agent': '$MOD_ABS'}}}}" \
	"the new file holds the fragment"
is "$(stat -c %a "$T/new/dir/policies.json")" 644 "a new file is world-readable (Firefox runs as the user)"

# ---------------------------------------------------------------- bad files change nothing
# bad_case NAME CONTENT EXPECT-IN-STDERR
bad_case() {
	printf '%s' "$2" >"$T/bad-$1.json"
	cp "$T/bad-$1.json" "$T/bad-$1.orig"
	run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$T/bad-$1.json"
	rc_is 1 "bad file ($1) is refused"
	stderr_has "$3" "bad file ($1): the error says '$3'"
	check "bad file ($1) is left as it was" cmp "$T/bad-$1.orig" "$T/bad-$1.json"
	if ls "$T"/bad-"$1".json.* >/dev/null 2>&1; then
		not_ok "bad file ($1) leaves no temporary file"
	else
		ok "bad file ($1) leaves no temporary file"
	fi
}
bad_case syntax $'{\n  "policies": {\n    "A": [1,\n  }\n' "bad-syntax.json:4: not valid JSON"
bad_case truncated $'{\n  "policies": {\n' "bad-truncated.json:3: not valid JSON"
bad_case trailing $'{"policies": {}}\n{}\n' "text after the JSON object"
bad_case array $'[1, 2]\n' "bad-array.json:1: not a JSON object"
bad_case policies $'{"policies": [1]}\n' '"policies" is not a JSON object'
bad_case devices $'{"policies": {"SecurityDevices": "x"}}\n' '"SecurityDevices" is not a JSON object'
mkdir -p "$T/adir"
run "$P11AGENT" setup firefox-policy --module "$MOD" --file "$T/adir"
rc_is 1 "a directory as --file is refused"
stderr_has "not a regular file" "the error says it is not a regular file"

# ---------------------------------------------------------------- --system
# In a private mount namespace with an overlay over /etc whose upper layer
# is a tmpfs of that namespace: the system's /etc is never written.
# ns_etc SCRIPT ARGS...: runs sh -c SCRIPT there (as run).
ns_etc() {
	local script=$1
	shift
	# shellcheck disable=SC2016 # expanded by the inner shell
	run unshare -m sh -c 'mount -t tmpfs p11a-test "$1" && mkdir "$1/up" "$1/work" &&
		mount -t overlay p11a-test -o "lowerdir=/etc,upperdir=$1/up,workdir=$1/work" /etc ||
		exit 125
		shift; '"$script" sh "$T/ovl" "$@"
}
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
	mkdir -p "$T/ovl"
	etc_before=$(ls -laR /etc/firefox 2>&1; echo "exit $?")
	printf '{"policies": {"DisableAppUpdate": true}}\n' >"$T/pre.json"
	# shellcheck disable=SC2016 # expanded by the inner shell
	ns_etc 'mkdir -p /etc/firefox/policies && cp "$1" /etc/firefox/policies/policies.json &&
		"$2" setup firefox-policy --system --module "$3" --dry-run &&
		cmp "$1" /etc/firefox/policies/policies.json &&
		"$2" setup firefox-policy --system --module "$3" &&
		cp /etc/firefox/policies/policies.json "$4"' "$T/pre.json" "$P11AGENT" "$MOD" "$T/sys.json"
	rc_is 0 "setup firefox-policy --system (private /etc)"
	stdout_has "would write /etc/firefox/policies/policies.json" "--system --dry-run names /etc/firefox/policies/policies.json"
	stdout_has "Wrote /etc/firefox/policies/policies.json" "--system writes /etc/firefox/policies/policies.json"
	jq_is "$T/sys.json" "d['policies'] == {'DisableAppUpdate': True, 'SecurityDevices': {'Add': {'p11agent': '$MOD_ABS'}}}" \
		"--system merged the module and kept the administrator's policy"
	# shellcheck disable=SC2016 # expanded by the inner shell
	ns_etc '"$1" setup firefox-policy --system --module "$2" && ls -ld /etc/firefox/policies /etc/firefox/policies/policies.json' \
		"$P11AGENT" "$MOD"
	rc_is 0 "--system with no /etc/firefox makes it"
	stdout_has "drwxr-xr-x" "the policies directory is world-readable"
	is "$(ls -laR /etc/firefox 2>&1; echo "exit $?")" "$etc_before" "the system's /etc/firefox was not touched"
else
	ok "setup firefox-policy --system # SKIP needs root and unshare"
fi

done_testing
