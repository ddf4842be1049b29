//! The serial console: the worker is the one client of QEMU's serial socket. It appends
//! everything to the VM's console log, relays it to interactive clients on `console.sock`
//! (`vireo vm console`), feeds their keystrokes back, and watches for the firmware refusing
//! the boot loader (Secure Boot).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};

/// What the console has seen that matters to the VM's status.
#[derive(Debug, Default)]
pub struct ConsoleFacts {
    /// Firmware refused the boot loader: the message to show.
    pub boot_refusal: Option<String>,
    /// Tail of the console text (bounded), for pattern detection across reads.
    tail: String,
}

/// Runs the console relay until QEMU closes the serial socket for good.
pub async fn run(
    serial_sock: PathBuf,
    console_sock: PathBuf,
    log_path: PathBuf,
    facts: Arc<Mutex<ConsoleFacts>>,
) {
    let (out_tx, _) = broadcast::channel::<Vec<u8>>(256);
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(64);
    let _ = std::fs::remove_file(&console_sock);
    match UnixListener::bind(&console_sock) {
        Ok(listener) => {
            tokio::spawn(serve_clients(listener, out_tx.clone(), in_tx));
        }
        Err(e) => tracing::warn!("console socket {}: {e}", console_sock.display()),
    }
    let mut log = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .await
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("console log {}: {e}", log_path.display());
            None
        }
    };
    let mut stream = match connect_retry(&serial_sock).await {
        Some(s) => s,
        None => return,
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                let chunk = &buf[..n];
                if let Some(f) = log.as_mut() {
                    let _ = f.write_all(chunk).await;
                }
                let _ = out_tx.send(chunk.to_vec());
                observe(&facts, chunk);
            }
            Some(input) = in_rx.recv() => {
                if stream.write_all(&input).await.is_err() { break; }
            }
        }
    }
}

async fn connect_retry(path: &Path) -> Option<UnixStream> {
    for _ in 0..200 {
        if let Ok(s) = UnixStream::connect(path).await {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tracing::warn!("cannot connect to the serial console at {}", path.display());
    None
}

/// Console lines that mean the firmware or the boot loader found nothing it could start.
const BOOT_FAILURES: &[&str] = &[
    "No bootable device",
    "No bootable option or device was found",
    "EFI stub: ERROR",
    "you need to load the kernel first",
    "Kernel panic - not syncing",
];

/// A console line without escape sequences and control characters.
fn clean(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip an ANSI sequence: ESC [ ... letter.
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out.trim().to_string()
}

fn observe(facts: &Mutex<ConsoleFacts>, chunk: &[u8]) {
    let mut f = facts.lock().unwrap_or_else(|p| p.into_inner());
    f.tail.push_str(&String::from_utf8_lossy(chunk));
    if f.tail.len() > 8192 {
        let cut = f.tail.len() - 4096;
        let cut = (cut..f.tail.len())
            .find(|i| f.tail.is_char_boundary(*i))
            .unwrap_or(0);
        f.tail.drain(..cut);
    }
    if f.boot_refusal.is_none() {
        if let Some(why) = qemu::firmware::detect_boot_refusal(&f.tail) {
            f.boot_refusal = Some(format!("firmware refused the boot loader: {why}"));
        } else if let Some(line) = f
            .tail
            .lines()
            .find(|l| BOOT_FAILURES.iter().any(|m| l.contains(m)))
        {
            f.boot_refusal = Some(format!("the guest did not boot: {}", clean(line)));
        }
    }
}

async fn serve_clients(
    listener: UnixListener,
    out: broadcast::Sender<Vec<u8>>,
    input: mpsc::Sender<Vec<u8>>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let mut rx = out.subscribe();
        let input = input.clone();
        tokio::spawn(async move {
            let (mut rd, mut wr) = client.into_split();
            let to_client = async {
                loop {
                    match rx.recv().await {
                        Ok(b) => {
                            if wr.write_all(&b).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                }
            };
            let from_client = async {
                let mut buf = [0u8; 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if input.send(buf[..n].to_vec()).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            };
            tokio::select! { _ = to_client => {}, _ = from_client => {} }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boot failures are recognised across chunk boundaries and shown without escapes.
    #[test]
    fn recognises_boot_failures() {
        let facts = Mutex::new(ConsoleFacts::default());
        observe(
            &facts,
            b"SeaBIOS\r\nBoot failed: not a bootable disk\r\n\x1b[0mNo boot",
        );
        assert!(facts.lock().unwrap().boot_refusal.is_none());
        observe(&facts, b"able device.\r\n");
        assert_eq!(
            facts.lock().unwrap().boot_refusal.as_deref(),
            Some("the guest did not boot: No bootable device.")
        );
    }

    /// A healthy boot log sets nothing.
    #[test]
    fn healthy_boot_is_quiet() {
        let facts = Mutex::new(ConsoleFacts::default());
        observe(&facts, b"Linux version 6.1\r\nVIREO-GUEST-READY\r\n");
        assert!(facts.lock().unwrap().boot_refusal.is_none());
    }
}
