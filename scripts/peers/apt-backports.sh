# shellcheck shell=bash
# Sourced by fixtures.sh and vduse.sh: a private apt configuration for <codename>-backports.
# The caller sets APT (a private directory) and BPO (the suite) and defines die(). The backports
# source is derived at run time from the machine's own first Debian source (first deb822 stanza of
# /etc/apt/sources.list.d/*.sources, else the first deb line of /etc/apt/sources.list) with the suite
# replaced: no mirror host name is written anywhere. apt uses its own lists and cache; the system's
# apt state is read (dpkg status) but never written.
APT_OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
	-o "Dir::State=$APT/state" -o "Dir::State::status=/var/lib/dpkg/status" -o "Dir::Cache=$APT/cache"
	-o "Debug::NoLocking=1")

derive_backports_source() {
	mkdir -p "$APT/sources.list.d" "$APT/state/lists/partial" "$APT/cache/archives/partial"
	: >"$APT/sources.list"
	local f
	f="$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 || true)"
	if [ -n "$f" ]; then
		# First deb822 stanza, with the suite replaced.
		awk -v s="$BPO" '/^[[:space:]]*$/{if(seen) exit; next} {seen=1}
			/^Suites:/{print "Suites: " s; next} {print}' "$f" >"$APT/sources.list.d/backports.sources"
		grep -q '^URIs:' "$APT/sources.list.d/backports.sources" || die "no URIs in first stanza of $f"
	elif [ -f /etc/apt/sources.list ]; then
		awk -v s="$BPO" '/^deb[[:space:]]/{ $3=s; print; exit }' /etc/apt/sources.list >"$APT/sources.list"
		[ -s "$APT/sources.list" ] || die "no deb line in /etc/apt/sources.list"
	else
		die "no apt sources found to derive $BPO from"
	fi
}
