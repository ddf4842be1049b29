//! Guest disk I/O for the end-to-end tests, written once: finding a data disk by size (the
//! guest's sd/vd names are not stable across boots), writing random MiB-sized blocks and
//! reading their sha256 back with the page cache dropped, the checksummed 4 KiB record writer
//! and its verifier, and host-side sha256 helpers that use the same tool as the guest.

use crate::multihost::NsHost;
use crate::Host;
use std::path::Path;
use std::process::{Command, Stdio};

/// Anything that can run a shell script inside a named guest through its agent.
pub trait GuestShell {
    /// Runs `script` in guest `vm`; returns its exit code and output.
    fn run(&self, vm: &str, script: &str) -> (i32, String);
}

impl GuestShell for Host {
    fn run(&self, vm: &str, script: &str) -> (i32, String) {
        self.exec(vm, script)
    }
}

impl GuestShell for NsHost {
    fn run(&self, vm: &str, script: &str) -> (i32, String) {
        self.exec(vm, script)
    }
}

/// Shell prelude that sets `$D` to the guest disk of `sectors` 512-byte sectors, or fails
/// naming the size. Disks are found by size because the IDE ports are probed concurrently:
/// on a loaded host the data disk once came up as /dev/sda and the boot disk as /dev/sdb.
pub fn find_disk(sectors: u64) -> String {
    format!(
        "D=; for d in /sys/block/sd* /sys/block/vd*; do if [ \"$(cat $d/size 2>/dev/null)\" = {sectors} ]; then D=/dev/${{d##*/}}; fi; done; \
         [ -b \"$D\" ] || {{ echo 'no disk of {sectors} sectors in /sys/block' >&2; exit 1; }}; "
    )
}

/// Sectors of the 64 MiB data disk most single-host tests attach.
pub const DISK_64M: u64 = 131_072;

/// sha256 of a MiB of zeroes (an unwritten block).
pub const ZERO_MIB_SHA256: &str =
    "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58";

/// Writes `count` MiB of fresh random data at MiB `at` of the 64 MiB data disk of `vm`
/// (each with fsync) and returns the sha256 of each MiB written.
pub fn write_random(h: &impl GuestShell, vm: &str, at: usize, count: usize) -> Vec<String> {
    let script = format!(
        "set -e; {} for i in $(seq {at} {}); do head -c 1048576 /dev/urandom > /tmp/b; \
         dd if=/tmp/b of=$D bs=1048576 seek=$i conv=fsync 2>/dev/null; sha256sum /tmp/b | cut -d' ' -f1; done",
        find_disk(DISK_64M),
        at + count - 1
    );
    let (code, out) = h.run(vm, &script);
    assert_eq!(code, 0, "guest write failed: {out}");
    let sums: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(sums.len(), count, "{out}");
    sums
}

/// sha256 of each MiB in `[at, at+count)` of the 64 MiB data disk of `vm`, read after
/// dropping the guest's page cache (so the bytes come from the disk service).
pub fn read_sums(h: &impl GuestShell, vm: &str, at: usize, count: usize) -> Vec<String> {
    let script = format!(
        "set -e; {} sync; echo 3 > /proc/sys/vm/drop_caches; for i in $(seq {at} {}); do \
         dd if=$D bs=1048576 skip=$i count=1 2>/dev/null | sha256sum | cut -d' ' -f1; done",
        find_disk(DISK_64M),
        at + count - 1
    );
    let (code, out) = h.run(vm, &script);
    assert_eq!(code, 0, "guest read failed: {out}");
    out.lines().map(|l| l.trim().to_string()).collect()
}

/// The checksummed record writer, started in the background in the guest. It keeps a
/// counter in memory (mirrored in /tmp/counter, the initramfs) and writes 4 KiB records to
/// the 16 MiB data disk, slot `seq % 64`, each 4000 random bytes + "seq sha256", with
/// fsync. A restarted writer continues the counter.
pub const RECORD_WRITER: &str = r#"cat > /tmp/w.sh <<'EOS'
D=$(for d in /sys/block/sd* /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = 32768 ] && echo /dev/${d##*/}; done | head -1)
i=$(cat /tmp/counter 2>/dev/null || echo 0)
while true; do
  i=$((i+1))
  head -c 4000 /dev/urandom > /tmp/r
  s=$(sha256sum /tmp/r | cut -c1-64)
  { cat /tmp/r; printf '%s %s\n' "$i" "$s"; } > /tmp/rec
  dd if=/tmp/rec of=$D bs=4096 seek=$((i % 64)) count=1 conv=sync,fsync 2>/dev/null
  echo $i > /tmp/counter
  sleep 0.05
done
EOS
setsid sh /tmp/w.sh >/dev/null 2>&1 &
echo $! > /tmp/w.pid; echo started"#;

/// Stops the [`RECORD_WRITER`] and checks every record: its checksum, its slot, and that
/// the last acknowledged write is there (a record one past the counter is the write the kill
/// interrupted before the counter moved). Prints `OK <last> <records>` or what is wrong.
pub const RECORD_VERIFY: &str = r#"kill $(cat /tmp/w.pid); sleep 0.3; sync; echo 3 > /proc/sys/vm/drop_caches
D=$(for d in /sys/block/sd* /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = 32768 ] && echo /dev/${d##*/}; done | head -1)
last=$(cat /tmp/counter); n=0; bad=""
for k in $(seq 0 63); do
  dd if=$D of=/tmp/b bs=4096 skip=$k count=1 2>/dev/null
  t=$(dd if=/tmp/b bs=1 skip=4000 2>/dev/null | tr -d '\000')
  [ -z "$t" ] && continue
  seq=${t%% *}; sum=${t#* }
  got=$(head -c 4000 /tmp/b | sha256sum | cut -c1-64)
  [ "$got" = "$sum" ] || bad="$bad sum@$k"
  [ $((seq % 64)) -eq $k ] || bad="$bad slot@$k"
  [ $seq -le $((last + 1)) ] && [ $seq -gt $((last - 64)) ] || bad="$bad seq@$k($seq/$last)"
  n=$((n+1))
done
t=$(dd if=$D bs=4096 skip=$((last % 64)) count=1 2>/dev/null | dd bs=1 skip=4000 2>/dev/null | tr -d '\000')
[ "${t%% *}" = "$last" ] || bad="$bad lost-last($t/$last)"
if [ -z "$bad" ]; then echo "OK $last $n"; else echo "BAD$bad"; fi"#;

/// sha256 of `b` in hex, by `sha256sum` (the tool the guest's data was summed with).
pub fn sha256_hex(b: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    c.stdin
        .take()
        .expect("sha256sum stdin")
        .write_all(b)
        .expect("write to sha256sum");
    let o = c.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// sha256 of the file at `p` in hex, by `sha256sum`.
pub fn sha256_file(p: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum (coreutils)");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Names of the files in `dir`, sorted (empty when it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
