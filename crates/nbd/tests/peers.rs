//! Interoperability with real NBD clients: libnbd tools, qemu-img, qemu-io
//! and fio, against a FileExport served in-process over a unix socket.

mod common;

use std::sync::Arc;

use common::*;
use nbd::{Export, FileExport};

const MIB: u64 = 1 << 20;

fn file_server(
    dir: &std::path::Path,
    size: u64,
    data: &[(u64, usize)],
) -> (TestServer, std::path::PathBuf) {
    let img = dir.join("disk.img");
    make_image(&img, size, data);
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&img, false).unwrap());
    (
        TestServer::start(&dir.join("nbd.sock"), vec![("", export)]),
        img,
    )
}

/// nbdinfo sees size, flags, block size constraints and base:allocation,
/// and its map matches the holes of the raw file.
#[test]
fn nbdinfo_reports_export_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _img) = file_server(
        dir.path(),
        64 * MIB,
        &[(8 * MIB, MIB as usize), (32 * MIB, 2 * MIB as usize)],
    );
    let out = run_ok("nbdinfo", &["--json", &srv.uri("")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(v["structured"], true);
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["is_read_only"], false);
    for f in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[f], true, "{f}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(e["contexts"][0], "base:allocation");

    let out = run_ok("nbdinfo", &["--map", &srv.uri("")]);
    let map: Vec<(u64, u64, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 8 * MIB, 3),
            (8 * MIB, MIB, 0),
            (9 * MIB, 23 * MIB, 3),
            (32 * MIB, 2 * MIB, 0),
            (34 * MIB, 30 * MIB, 3)
        ]
    );
    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", srv.socket.display()),
        ],
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains("export=\"\""));
}

/// nbdcopy raw -> nbd and nbd -> raw (multi-conn, many requests in flight)
/// preserves every byte.
#[test]
fn nbdcopy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, img) = file_server(dir.path(), 48 * MIB, &[]);
    let src = dir.path().join("src.raw");
    make_image(
        &src,
        48 * MIB,
        &[
            (0, 3 * MIB as usize),
            (10 * MIB + 512, 5 * MIB as usize),
            (47 * MIB, MIB as usize),
        ],
    );
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            src.to_str().unwrap(),
            &srv.uri(""),
        ],
    );
    let back = dir.path().join("back.raw");
    run_ok(
        "nbdcopy",
        &["--connections=2", &srv.uri(""), back.to_str().unwrap()],
    );
    let a = std::fs::read(&src).unwrap();
    assert_eq!(a, std::fs::read(&back).unwrap(), "nbd -> raw copy differs");
    assert_eq!(
        a,
        std::fs::read(&img).unwrap(),
        "served file differs from source"
    );
    let st = srv.server.stats("").unwrap();
    assert!(st.bytes_written >= 9 * MIB && st.reads > 0, "{st:?}");
}

/// qemu-img convert into the export and compare against the source;
/// qemu-io write patterns (with FUA, zeroes, discard) read back.
#[test]
fn qemu_img_and_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _img) = file_server(dir.path(), 32 * MIB, &[]);
    let src = dir.path().join("src.raw");
    make_image(
        &src,
        32 * MIB,
        &[(MIB, 4 * MIB as usize), (20 * MIB, 64 << 10)],
    );
    let uri = srv.uri("");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "discard 4M 1M",
            "-c",
            "write -P 0x11 5M 4k",
            "-c",
            "flush",
            "-c",
            "read -P 0x11 5M 4k",
            "-c",
            "aio_write -P 0x21 8M 64k",
            "-c",
            "aio_write -P 0x22 9M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x21 8M 64k",
            "-c",
            "read -P 0x22 9M 64k",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert_eq!(text.matches("read ").count(), 6, "{text}");
}

/// fio's nbd engine at queue depth 32 writes random 4k blocks and verifies
/// them (crc32c), exercising many requests in flight with out-of-order
/// completion.
#[test]
fn fio_qd32_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _img) = file_server(dir.path(), 64 * MIB, &[]);
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri("")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{json}");
    assert_eq!(job["write"]["io_bytes"], 16 * MIB, "{json}");
    assert_eq!(
        job["read"]["io_bytes"],
        16 * MIB,
        "verify pass read everything back: {json}"
    );
}

/// Two clients write different regions at the same time over separate
/// connections; both patterns are intact afterwards.
#[test]
fn two_connections_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, img) = file_server(dir.path(), 32 * MIB, &[]);
    let uri = srv.uri("");
    let handles: Vec<_> = [(0u64, "0x5a"), (16, "0xa5")]
        .into_iter()
        .map(|(base, pat)| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let mut args = vec!["-f".to_string(), "raw".to_string(), uri];
                for i in 0..16u64 {
                    args.push("-c".into());
                    args.push(format!("aio_write -P {pat} {}M 1M", base + i));
                }
                args.push("-c".into());
                args.push("aio_flush".into());
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                run_ok("qemu-io", &a)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let data = std::fs::read(img).unwrap();
    assert!(data[..16 << 20].iter().all(|b| *b == 0x5a));
    assert!(data[16 << 20..].iter().all(|b| *b == 0xa5));
    let st = srv.server.stats("").unwrap();
    assert_eq!(st.total_connections, 2);
    assert_eq!(st.bytes_written, 32 * MIB);
}

/// The same server over loopback TCP: nbdinfo reads the export by name and
/// qemu-io verifies a written pattern.
#[test]
fn loopback_tcp() {
    let server = nbd::Server::new(nbd::ServerConfig::default()).unwrap();
    let e: Arc<dyn Export> = Arc::new(nbd::MemExport::new(8 * MIB));
    server.add_export("tcpdisk", e).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    let serving = rt.spawn(async move { s.serve_tcp(listener).await });
    let uri = format!("nbd://127.0.0.1:{port}/tcpdisk");
    let out = run_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (8 * MIB).to_string()
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x3c 4k 8k",
            "-c",
            "read -P 0x3c 4k 8k",
        ],
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
    server.shutdown();
    rt.block_on(serving).unwrap().unwrap();
    assert_eq!(server.stats("tcpdisk").unwrap().bytes_written, 8192);
}
