//! Reads an NBD export's size with the fixed-newstyle handshake (`NBD_OPT_INFO`, then
//! `NBD_OPT_ABORT`), without transmitting any data.

use api::migration::ExportFacts;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

fn bad(m: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.into())
}

/// What a client sees of `export` served on `socket`.
pub async fn export_facts(socket: &Path, export: &str) -> std::io::Result<ExportFacts> {
    tokio::time::timeout(Duration::from_secs(10), probe(socket, export))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "NBD handshake timed out"))?
}

async fn probe(socket: &Path, export: &str) -> std::io::Result<ExportFacts> {
    let mut s = UnixStream::connect(socket).await?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).await?;
    if &magic != b"NBDMAGIC" || s.read_u64().await? != IHAVEOPT {
        return Err(bad("not a fixed-newstyle NBD server"));
    }
    let flags = s.read_u16().await?;
    if flags & 1 == 0 {
        return Err(bad("the NBD server does not do fixed newstyle"));
    }
    s.write_u32(1 | (flags as u32 & 2)).await?;
    let name = export.as_bytes();
    s.write_u64(IHAVEOPT).await?;
    s.write_u32(OPT_INFO).await?;
    s.write_u32(4 + name.len() as u32 + 4).await?;
    s.write_u32(name.len() as u32).await?;
    s.write_all(name).await?;
    s.write_u16(1).await?;
    s.write_u16(INFO_BLOCK_SIZE).await?;
    s.flush().await?;
    let mut facts = ExportFacts::default();
    let mut size = None;
    loop {
        if s.read_u64().await? != REPLY_MAGIC {
            return Err(bad("bad NBD option reply magic"));
        }
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await? as usize;
        if len > 1 << 16 {
            return Err(bad("NBD option reply too long"));
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).await?;
        if kind & 0x8000_0000 != 0 {
            return Err(bad(format!(
                "the NBD server refused export {export:?}: {}",
                String::from_utf8_lossy(&data)
            )));
        }
        match kind {
            REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                size = Some(u64::from_be_bytes(b));
                facts.flags = u16::from_be_bytes([data[10], data[11]]);
            }
            REP_INFO if len >= 14 && u16::from_be_bytes([data[0], data[1]]) == INFO_BLOCK_SIZE => {
                let u =
                    |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
                facts.block_size = Some((u(2), u(6), u(10)));
            }
            REP_ACK => break,
            _ => {}
        }
    }
    s.write_u64(IHAVEOPT).await?;
    s.write_u32(OPT_ABORT).await?;
    s.write_u32(0).await?;
    let _ = s.flush().await;
    facts.size = size.ok_or_else(|| bad("the NBD server sent no export size"))?;
    Ok(facts)
}
