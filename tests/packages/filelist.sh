#!/bin/bash
# filelist.sh DEB_DIR RPM_DIR: do the Debian and the RPM packages of
# p11agent ship the same files?
#
# Lists the files and symbolic links (not directories) of the three .deb
# packages in DEB_DIR (dbgsym packages left out) and of the three binary
# RPMs under RPM_DIR, each as "PACKAGE PATH", normalizes what differs by
# distribution convention only, drops the paths filelist-exclude.txt names
# (each with its reason), and compares.  Normalized:
#   - the library directory: /usr/lib/<multiarch triplet>/ (Debian) and
#     /usr/lib64/ (RPM) are LIBDIR/;
#   - compressed man pages and documents (.gz, which Debian's tools add);
#   - the documentation directory /usr/share/doc/PKG[-VERSION]/ is DOC(PKG)/.
# Prints both lists on a difference.  Exit 0 when they agree.
set -eu
if [ $# -ne 2 ]; then
	echo "usage: filelist.sh DEB_DIR RPM_DIR" >&2
	exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
deb_dir=$1 rpm_dir=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/p11agent-filelist.XXXXXX")
trap 'rm -rf "$work"' EXIT

normalize() {
	sed -E -e 's#^([^ ]+) \.?/#\1 /#' \
		-e 's# /usr/lib/[a-z0-9_]+-linux-[a-z0-9_]+/# LIBDIR/#' -e 's# /usr/lib64/# LIBDIR/#' \
		-e 's#\.gz$##' \
		-e 's# /usr/share/doc/(p11agent(-[a-z][a-z0-9]*)?)(-[0-9][0-9.]*)?/# DOC(\1)/#'
}
# drop_excluded: keep "PACKAGE PATH" lines whose PATH no exclude matches.
drop_excluded() {
	local re
	re=$(grep -vE '^(#|$)' "$here/filelist-exclude.txt" | paste -sd '|')
	awk -v re="$re" '{ p = $0; sub(/^[^ ]+ /, "", p); if (p !~ re) print }'
}

debs=() rpms=()
for f in "$deb_dir"/*.deb; do
	[ -e "$f" ] || continue
	case $(dpkg-deb -f "$f" Package) in *-dbgsym) ;; *) debs+=("$f") ;; esac
done
while IFS= read -r f; do rpms+=("$f"); done < <(find "$rpm_dir" -path '*/RPMS/*' -name '*.rpm' | sort)
[ "${#debs[@]}" -eq 3 ] || { echo "filelist.sh: expected 3 .deb packages in $deb_dir, found ${#debs[@]}" >&2; exit 1; }
[ "${#rpms[@]}" -eq 3 ] || { echo "filelist.sh: expected 3 binary RPMs under $rpm_dir, found ${#rpms[@]}" >&2; exit 1; }

for f in "${debs[@]}"; do
	# Type letter first: d(irectory), -(file), l(ink); the path is the 6th field.
	dpkg-deb -c "$f" | awk -v p="$(dpkg-deb -f "$f" Package)" 'substr($1, 1, 1) != "d" { print p, $6 }'
done | normalize | drop_excluded | sort >"$work/deb"
for f in "${rpms[@]}"; do
	rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$f" 2>/dev/null |
		awk -v p="$(rpm -qp --qf '%{NAME}' "$f" 2>/dev/null)" 'substr($1, 1, 1) != "d" { print p, $2 }'
done | normalize | drop_excluded | sort >"$work/rpm"

if diff -u "$work/deb" "$work/rpm" >"$work/diff"; then
	echo "filelist.sh: the Debian and RPM packages ship the same $(wc -l <"$work/deb") files:"
	sed 's/^/  /' "$work/deb"
	exit 0
fi
echo "filelist.sh: the Debian (-) and RPM (+) packages differ:"
sed 's/^/  /' "$work/diff"
exit 1
