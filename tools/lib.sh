# Helpers shared by tools/demo and tools/test. Source it; it defines functions only
# (and `repo`, the work tree's root), so sourcing has no side effects.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Bold step headers when stdout is a terminal, plain text in CI logs.
if [[ -t 1 ]]; then
    _bold=$'\e[1m' _red=$'\e[31m' _off=$'\e[0m'
else
    _bold='' _red='' _off=''
fi
step() { printf '\n%s==> %s%s\n' "$_bold" "$*" "$_off"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '%s    !! %s%s\n' "$_red" "$*" "$_off" >&2; }

# The freestanding test guest: build.rs writes it under target/*/build/ember-*/out/;
# the newest wins. Falls back to a hand-built tests/guest/ember-test-guest. Prints
# nothing and returns 1 when there is none.
find_test_guest() {
    local f newest=''
    for f in "$repo"/target/release/build/ember-*/out/ember-test-guest \
        "$repo"/target/debug/build/ember-*/out/ember-test-guest; do
        [[ -f $f ]] || continue
        if [[ -z $newest || $f -nt $newest ]]; then newest=$f; fi
    done
    [[ -z $newest && -f $repo/tests/guest/ember-test-guest ]] && newest=$repo/tests/guest/ember-test-guest
    [[ -n $newest ]] || return 1
    printf '%s\n' "$newest"
}

# Reads `tools/build-guest` output (name=path lines, shell-quoted) from stdin and sets
# guest_vmlinux, guest_bzimage, guest_rootfs, guest_config. Only these names are
# accepted, and quoting is undone by xargs (quotes and backslashes, no expansion), so
# nothing in the output runs as shell code.
read_guest_paths() {
    local line name value
    guest_vmlinux='' guest_bzimage='' guest_rootfs='' guest_config=''
    while IFS= read -r line; do
        [[ $line =~ ^(vmlinux|bzimage|rootfs|config)=(.*)$ ]] || continue
        name=${BASH_REMATCH[1]}
        value=$(printf '%s\n' "${BASH_REMATCH[2]}" | xargs printf '%s') || value=${BASH_REMATCH[2]}
        printf -v "guest_$name" '%s' "$value"
    done
}

# A JSON string literal for $1 (paths and boot args; no control characters expected).
json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

# Writes a Firecracker-schema VM config: file kernel boot_args vcpus mem_mib [root_drive]
write_vm_config() {
    local file=$1 kernel=$2 args=$3 vcpus=$4 mem=$5 root=${6:-}
    {
        printf '{"boot-source":{"kernel_image_path":%s,"boot_args":%s},' \
            "$(json_str "$kernel")" "$(json_str "$args")"
        printf '"machine-config":{"vcpu_count":%d,"mem_size_mib":%d}' "$vcpus" "$mem"
        if [[ -n $root ]]; then
            printf ',"drives":[{"drive_id":"rootfs","path_on_host":%s,' "$(json_str "$root")"
            printf '"is_root_device":true,"is_read_only":false}]'
        fi
        printf '}\n'
    } >"$file"
}

is_pvm_host() { [[ -e /sys/module/kvm_pvm ]]; }
