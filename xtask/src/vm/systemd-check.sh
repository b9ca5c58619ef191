#!/bin/bash
# zt's systemd suite, inside the guest (systemd is PID 1): installs the package and checks
# what README promises of it. Run by zt-check.service; output on the serial console. Each
# check prints `ZT-CHECK: PASS|FAIL NAME: detail`; xtask requires a PASS for each name it
# knows (xtask/src/vm/systemd.rs), so a check that does not run fails the suite too.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_PAGER= SYSTEMD_COLORS=0
echo "ZT-VM: booted: kernel $(uname -r) after $(cut -d' ' -f1 /proc/uptime)s; systemd $(systemctl --version | head -1)"
status=0
pass() { echo "ZT-CHECK: PASS $1: $2"; }
fail() { echo "ZT-CHECK: FAIL $1: $2"; status=1; }
# `check NAME DETAIL CMD...`: PASS when CMD succeeds.
check() {
    local name=$1 detail=$2
    shift 2
    if "$@"; then pass "$name" "$detail"; else fail "$name" "$detail"; fi
}
# `wait_for SECS CMD...`: poll CMD every second until it succeeds (TCG is slow).
wait_for() {
    local n=$1
    shift
    for _ in $(seq "$n"); do
        "$@" && return 0
        sleep 1
    done
    "$@"
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# Programs attached to the root cgroup (ztd guards the whole guest by default): `ID TYPE`.
attached() { bpftool cgroup show /sys/fs/cgroup 2>/dev/null | awk 'NR>1 && $1 ~ /^[0-9]+$/ {print $1, $2}'; }
hook_types() { attached | awk '{print $2}' | sort; }
one_per_hook() { [ -n "$(attached)" ] && [ -z "$(hook_types | uniq -d)" ]; }
generation() { ztctl status 2>/dev/null | awk '$1 == "generation" {print $2}'; }
show_journal() { journalctl -u ztd --no-pager -o short-monotonic | tail -n "${1:-15}" | sed 's/^/  journal| /'; }

echo "ZT-SD: mounts: $(grep -E ' (bpf|cgroup2) ' /proc/self/mounts | tr '\n' ';')"
deb=$(ls /zt/zt_*.deb)
echo "ZT-SD: installing $deb (uptime $(uptime_s)s)"
check install "dpkg -i $(basename "$deb")" dpkg -i "$deb"
check install-starts-nothing "the package enables and starts nothing" \
    bash -c '! systemctl is-active -q ztd && ! systemctl is-enabled -q ztd && [ ! -e /sys/fs/bpf/zt ]'

echo "ZT-SD: systemctl enable --now ztd (uptime $(uptime_s)s)"
t0=$(date +%s)
if systemctl enable --now ztd; then
    # No wait: Type=notify means the programs are attached when systemctl returns.
    att=$(attached)
    if [ -n "$att" ] && one_per_hook && ztctl status >/dev/null; then
        pass enable-now "returned after $(($(date +%s) - t0))s with $(echo "$att" | wc -l) programs attached to the root cgroup, ztctl status healthy"
    else
        fail enable-now "returned but enforcement is not in place: attached=[$att] status=$(ztctl status 2>&1 | head -3)"
    fi
else
    fail enable-now "systemctl enable --now ztd failed"
    systemctl status ztd --no-pager | sed 's/^/  | /'
fi
show_journal 8
check audit-default "ztctl status says mode audit" bash -c 'ztctl status | grep -Eq "^mode +audit$"'

# Reload: a valid policy moves the generation; an invalid one fails and changes nothing.
g0=$(generation)
cat >/etc/zt/policies/vm-check.toml <<'EOF'
version = 1
mode = "audit"
[[rule]]
action = "allow"
peer = "any"
ports = [8443]
proto = "tcp"
EOF
if systemctl reload ztd; then
    g1=$(generation)
    if [ -n "$g0" ] && [ -n "$g1" ] && [ "$g1" -gt "$g0" ]; then
        pass reload-valid "systemctl reload ztd: generation $g0 -> $g1"
    else
        fail reload-valid "generation did not move: $g0 -> $g1"
    fi
else
    fail reload-valid "systemctl reload ztd failed on a valid policy"
    show_journal
fi
g1=$(generation)
printf "version = 1\n[[rule]]\naction = \"allow\"\nports = [70000]\n" >/etc/zt/policies/vm-bad.toml
if systemctl reload ztd; then
    fail reload-invalid "systemctl reload ztd succeeded on an invalid policy"
else
    rc=$?
    g2=$(generation)
    if [ "$g2" = "$g1" ] && journalctl -u ztd --no-pager | grep -q "vm-bad.toml"; then
        pass reload-invalid "exit $rc, reason in journalctl -u ztd, generation stays $g2"
    else
        fail reload-invalid "exit $rc; generation $g1 -> $g2; journal:"
    fi
    journalctl -u ztd --no-pager | grep "vm-bad.toml" | tail -3 | sed 's/^/  journal| /'
fi
rm -f /etc/zt/policies/vm-bad.toml /etc/zt/policies/vm-check.toml
check reload-restore "the shipped policy again" systemctl reload ztd

# Tamper: unpin a link; ztd reports it at warning priority (and repairs it).
link=/sys/fs/bpf/zt/links/connect4
if [ -n "$(journalctl -u ztd -p warning --no-pager -q | grep tamper)" ]; then
    fail tamper-journal "a tamper finding before anything was tampered with"
elif ! rm "$link"; then
    fail tamper-journal "could not unpin $link"
elif wait_for 120 bash -c 'journalctl -u ztd -p warning --no-pager -q | grep -q tamper'; then
    pass tamper-journal "$(journalctl -u ztd -p warning --no-pager -q -o cat | grep tamper | head -1)"
else
    fail tamper-journal "no tamper finding in journalctl -u ztd -p warning"
    show_journal
fi
check tamper-repaired "$link pinned again" wait_for 120 test -e "$link"

# Exposure of the unit, while it is installed and running.
echo "ZT-SD: systemd-analyze security ztd:"
systemd-analyze security --no-pager ztd.service 2>&1 | grep -v '✓' | sed 's/^/  security| /'
score=$(systemd-analyze security --no-pager ztd.service 2>/dev/null | sed -n 's/.*Overall exposure level for ztd.service: *//p')
echo "ZT-SD-EXPOSURE: $score"

# Stop keeps enforcement; restart adopts (one program per hook, the same hooks).
before=$(attached)
types_before=$(hook_types)
check stop "systemctl stop ztd" systemctl stop ztd
if [ -n "$before" ] && [ "$(attached)" = "$before" ] && [ -n "$(ls /sys/fs/bpf/zt/links)" ]; then
    pass stop-keeps "after stop: the same $(echo "$before" | wc -l) programs attached, $(ls /sys/fs/bpf/zt/links | wc -l) links pinned"
else
    fail stop-keeps "before=[$before] after=[$(attached)]"
fi
if systemctl restart ztd; then
    if one_per_hook && [ "$(hook_types)" = "$types_before" ] \
        && journalctl -u ztd --no-pager -q | grep -q adopted && ztctl status >/dev/null; then
        pass restart-adopts "one program per hook on the same $(echo "$types_before" | wc -l) hooks; ztd says: $(journalctl -u ztd --no-pager -q -o cat | grep adopted | tail -1)"
    else
        fail restart-adopts "after restart: [$(attached)]"
        show_journal
    fi
else
    fail restart-adopts "systemctl restart ztd failed"
    show_journal
fi

# Removal unloads; purge leaves nothing.
echo "ZT-SD: dpkg -r zt (uptime $(uptime_s)s)"
dpkg -r zt 2>&1 | sed 's/^/  dpkg| /'
if [ ! -e /sys/fs/bpf/zt ] && [ -z "$(attached)" ] && ! systemctl is-active -q ztd; then
    pass remove-unloads "ztd stopped, /sys/fs/bpf/zt gone, nothing attached to the root cgroup"
else
    fail remove-unloads "left: $(ls -R /sys/fs/bpf/zt 2>&1 | head -3) attached=[$(attached)]"
fi
dpkg -P zt 2>&1 | sed 's/^/  dpkg| /'
left=""
for p in /etc/zt /var/lib/zt /var/log/zt /run/zt /lib/systemd/system/ztd.service \
    /etc/systemd/system/sysinit.target.wants/ztd.service /usr/bin/ztd /usr/bin/ztctl \
    /usr/share/doc/zt /sys/fs/bpf/zt; do
    [ -e "$p" ] || [ -L "$p" ] && left="$left $p"
done
if [ -z "$left" ] && ! dpkg-query -W zt >/dev/null 2>&1; then
    pass purge-leaves-nothing "no /etc/zt, /var/lib/zt, unit, binaries; dpkg knows no zt"
else
    fail purge-leaves-nothing "left:$left; dpkg: $(dpkg-query -W -f='${Status}' zt 2>&1)"
fi

echo "ZT-SD: done at uptime $(uptime_s)s"
if [ "$status" = 0 ]; then echo "ZT-VM-RESULT: PASS"; else echo "ZT-VM-RESULT: FAIL"; fi
sync
systemctl poweroff -ff
