//! `vireo-guest`: Vireo's guest agent. Speaks the QEMU guest agent protocol plus Vireo's
//! `vireo-*` extensions on the virtio-serial port `org.qemu.guest_agent.0`.
//!
//! Started with no arguments by the guest's init; `vireo-guest kvp ...` manages the KVP
//! pools from guest scripts. See docs/integration-services.md.

use std::fs::OpenOptions;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use agent::guest::{error_chain, transport, KvpStore, Server, ServerConfig, SystemMode};
use agent::protocol::KvpPool;

const USAGE: &str = "\
usage: vireo-guest [OPTIONS]            serve the guest agent port
       vireo-guest kvp set KEY VALUE      publish a pair to the host (guest pool)
       vireo-guest kvp get KEY [--pool host|guest]   (default pool: host)
       vireo-guest kvp list [--pool host|guest]      (default pool: host)
       vireo-guest kvp delete KEY         remove a pair from the guest pool

options:
  --device PATH      port device (default /dev/virtio-ports/org.qemu.guest_agent.0,
                     else the /dev/vportNpM whose sysfs name matches)
  --listen PATH      serve a unix socket instead of the port (testing on a host)
  --kvp-dir DIR      root of the KVP pools (default /run/vireo/kvp)
  --block-rpcs LIST  comma-separated commands to disable
  --simulate         record shutdown/set-time/fsfreeze instead of doing them (testing)
  --log TARGET       stderr, console, kmsg or a file path (default: stderr if open, else kmsg)
  -v, --verbose      debug logging
  -V, --version      print the version
";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(Default)]
struct Opts {
    device: Option<PathBuf>,
    listen: Option<PathBuf>,
    kvp_dir: Option<PathBuf>,
    blocked: Vec<String>,
    simulate: bool,
    log: Option<String>,
    verbose: bool,
    pool: Option<KvpPool>,
    positional: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--device" => o.device = Some(val(a)?.into()),
            "--listen" => o.listen = Some(val(a)?.into()),
            "--kvp-dir" => o.kvp_dir = Some(val(a)?.into()),
            "--block-rpcs" | "-b" => o.blocked.extend(
                val(a)?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            "--simulate" => o.simulate = true,
            "--log" => o.log = Some(val(a)?),
            "--pool" => {
                o.pool = Some(match val(a)?.as_str() {
                    "host" => KvpPool::Host,
                    "guest" => KvpPool::Guest,
                    p => return Err(format!("unknown pool '{p}' (host or guest)")),
                })
            }
            "-v" | "--verbose" => o.verbose = true,
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ => o.positional.push(a.clone()),
        }
    }
    Ok(o)
}

fn fd_is_open(fd: libc::c_int) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn init_logging(target: Option<&str>, verbose: bool) -> Result<(), String> {
    let level = if verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let open = |p: &str| {
        OpenOptions::new()
            .append(true)
            .create(!p.starts_with("/dev/"))
            .open(p)
            .map_err(|e| format!("opening log target {p}: {e}"))
    };
    let file = match target {
        Some("stderr") => None,
        Some("console") => Some(open("/dev/console")?),
        Some("kmsg") => Some(open("/dev/kmsg")?),
        Some(path) => Some(open(path)?),
        None if fd_is_open(2) => None,
        None => open("/dev/kmsg").or_else(|_| open("/dev/console")).ok(),
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false);
    match file {
        // One write per event, so each line is one kmsg record.
        Some(f) => builder.with_writer(Mutex::new(f)).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn kvp_main(o: &Opts) -> Result<ExitCode, String> {
    let store = KvpStore::new(
        o.kvp_dir
            .clone()
            .unwrap_or_else(|| agent::guest::DEFAULT_KVP_ROOT.into()),
    );
    let p: Vec<&str> = o.positional.iter().map(String::as_str).collect();
    let err = |e: agent::guest::KvpError| error_chain(&e);
    match p.as_slice() {
        ["kvp", "set", key, value] => {
            store.set(KvpPool::Guest, key, value).map_err(err)?;
        }
        ["kvp", "delete", key] => {
            store.delete(KvpPool::Guest, key).map_err(err)?;
        }
        ["kvp", "get", key] => {
            match store
                .get(o.pool.unwrap_or(KvpPool::Host), key)
                .map_err(err)?
            {
                Some(v) => println!("{v}"),
                None => {
                    eprintln!("vireo-guest: no key '{key}'");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        ["kvp", "list"] => {
            for pair in store.list(o.pool.unwrap_or(KvpPool::Host)).map_err(err)? {
                println!("{}={}", pair.key, pair.value);
            }
        }
        _ => return Err(format!("bad kvp command\n{USAGE}")),
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_main(o: &Opts) -> Result<ExitCode, String> {
    if !o.positional.is_empty() {
        return Err(format!(
            "unexpected argument '{}'\n{USAGE}",
            o.positional[0]
        ));
    }
    init_logging(o.log.as_deref(), o.verbose)?;
    // A kernel-started init may leave PATH unset; guest-exec looks programs up in it.
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let server = Arc::new(Server::new(ServerConfig {
        kvp_root: o
            .kvp_dir
            .clone()
            .unwrap_or_else(|| agent::guest::DEFAULT_KVP_ROOT.into()),
        blocked: o.blocked.clone(),
        system: if o.simulate {
            SystemMode::Simulated
        } else {
            SystemMode::Real
        },
    }));
    tracing::info!(version = agent::guest::VERSION, "vireo-guest starting");
    let r = match &o.listen {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l =
                UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
            transport::serve_listener(&server, &l, &STOP)
        }
        None => transport::serve_port(&server, o.device.as_deref(), &STOP),
    };
    server.release_freeze();
    tracing::info!("vireo-guest stopping");
    r.map_err(|e| format!("serving: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "-V" || a == "--version") {
        println!("vireo-guest {}", agent::guest::VERSION);
        return ExitCode::SUCCESS;
    }
    let r = parse(&args).and_then(|o| {
        if o.positional.first().map(String::as_str) == Some("kvp") {
            kvp_main(&o)
        } else {
            serve_main(&o)
        }
    });
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vireo-guest: {e}");
            ExitCode::from(2)
        }
    }
}
