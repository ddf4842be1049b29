//! Talk to a guest agent socket by hand (debugging aid):
//!
//! ```text
//! cargo run -p agent --example qga -- SOCKET ping|info|osinfo|hostname|interfaces|time|
//!     memory|freeze-status|heartbeat SECS|kvp-set K V|kvp-get host|guest K|kvp-list host|guest|
//!     shutdown powerdown|reboot|halt|exec CMD ARGS...
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use agent::{AgentClient, Heartbeat, KvpPool, RunEvent, RunRequest};
use futures::StreamExt;

fn pool(s: &str) -> KvpPool {
    if s == "host" {
        KvpPool::Host
    } else {
        KvpPool::Guest
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sock, rest) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("usage: qga SOCKET COMMAND..."))?;
    let c = AgentClient::new(sock);
    let a: Vec<&str> = rest.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    match a.as_slice() {
        ["ping"] => c.ping().await?,
        ["info"] => println!("{:#?}", c.info().await?),
        ["osinfo"] => println!("{:#?}", c.osinfo().await?),
        ["hostname"] => println!("{}", c.hostname().await?),
        ["interfaces"] => println!("{:#?}", c.interfaces().await?),
        ["time"] => println!("{}", c.get_time().await?),
        ["memory"] => println!("{:?}", c.memory_status().await?),
        ["freeze-status"] => println!("{:?}", c.fsfreeze_status().await?),
        ["vireo"] => println!("{}", c.supports_vireo_extensions().await?),
        ["kvp-set", k, v] => c.kvp_set(k, v).await?,
        ["kvp-get", p, k] => println!("{:?}", c.kvp_get(pool(p), k).await?),
        ["kvp-list", p] => println!("{:?}", c.kvp_list(pool(p)).await?),
        ["shutdown", m] => c.shutdown(m.parse().map_err(anyhow::Error::msg)?).await?,
        ["heartbeat", secs] => {
            let mut hb = Heartbeat::new(Duration::from_secs(3));
            let end = Instant::now() + Duration::from_secs(secs.parse()?);
            println!("{:>6.1}s {}", 0.0, hb.state(Instant::now()));
            while Instant::now() < end {
                let ok = c.ping().await.is_ok();
                if let Some((_, new)) = hb.observe(Instant::now(), ok) {
                    println!("{:>6.1}s {new}", t0.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        ["exec", argv @ ..] => {
            let req = RunRequest::from_argv(argv).ok_or_else(|| anyhow::anyhow!("no command"))?;
            let s = c.run(req);
            futures::pin_mut!(s);
            while let Some(ev) = s.next().await {
                match ev? {
                    RunEvent::Stdout(d) => std::io::stdout().write_all(&d)?,
                    RunEvent::Stderr(d) => std::io::stderr().write_all(&d)?,
                    RunEvent::Exited(x) => {
                        eprintln!("[exit {:?} signal {:?}]", x.code, x.signal);
                        std::process::exit(x.code.unwrap_or(128) as i32);
                    }
                }
            }
        }
        _ => anyhow::bail!("unknown command {a:?}"),
    }
    eprintln!("[{:.0} ms]", t0.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}
