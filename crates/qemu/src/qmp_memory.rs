//! QMP commands of dynamic memory: virtio-balloon guest statistics and virtio-mem size, as an
//! extra `impl QmpClient` block. The balloon itself (`balloon`, `query-balloon`, the stats
//! interval) is in [`crate::qmp`].

use crate::qmp::{QmpClient, QmpError, Result};
use serde_json::{json, Value};

/// The guest's memory statistics from the virtio-balloon driver (QOM `guest-stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestMemoryStats {
    /// `stats-total-memory` (guest `MemTotal`); `None`: not reported.
    pub total: Option<u64>,
    /// `stats-available-memory` (guest `MemAvailable`); `None`: not reported.
    pub available: Option<u64>,
    /// `stats-free-memory`; `None`: not reported.
    pub free: Option<u64>,
    /// `last-update`: guest time of the last report, seconds; 0 before the first one.
    pub last_update: u64,
}

impl GuestMemoryStats {
    /// Parses QOM `guest-stats`: `{"stats": {"stats-total-memory": N, ...}, "last-update": S}`.
    /// A statistic of -1 (or missing) was not reported by the guest.
    pub fn from_qom(v: &Value) -> Result<GuestMemoryStats> {
        let stats = v
            .get("stats")
            .and_then(Value::as_object)
            .ok_or_else(|| QmpError::Protocol(format!("guest-stats without stats: {v}")))?;
        let stat = |k: &str| stats.get(k).and_then(Value::as_u64);
        Ok(GuestMemoryStats {
            total: stat("stats-total-memory"),
            available: stat("stats-available-memory"),
            free: stat("stats-free-memory"),
            last_update: v.get("last-update").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// QMP `query-memory-size-summary`, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemorySizeSummary {
    /// `base-memory`: RAM the machine booted with (`-m`).
    pub base: u64,
    /// `plugged-memory`: memory-device RAM plugged now (virtio-mem `size`, DIMMs); 0 if none.
    pub plugged: u64,
}

impl MemorySizeSummary {
    /// Parses `{"base-memory": N, "plugged-memory": M}` (`plugged-memory` is optional).
    pub fn from_qmp(v: &Value) -> Result<MemorySizeSummary> {
        let base = v
            .get("base-memory")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Protocol(format!("memory size summary without base: {v}")))?;
        Ok(MemorySizeSummary {
            base,
            plugged: v.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

impl QmpClient {
    /// `query-memory-size-summary`: boot RAM and plugged memory-device RAM.
    pub async fn memory_size_summary(&self) -> Result<MemorySizeSummary> {
        MemorySizeSummary::from_qmp(&self.execute("query-memory-size-summary", None).await?)
    }

    /// The balloon device `id`'s guest memory statistics (see `set_balloon_stats_interval`).
    pub async fn guest_memory_stats(&self, id: &str) -> Result<GuestMemoryStats> {
        GuestMemoryStats::from_qom(&self.balloon_stats(id).await?)
    }

    /// Bytes the guest has plugged on the virtio-mem device `id` (QOM `size`).
    pub async fn virtio_mem_size(&self, id: &str) -> Result<u64> {
        let v = self
            .qom_get(&format!("/machine/peripheral/{id}"), "size")
            .await?;
        v.as_u64()
            .ok_or_else(|| QmpError::Protocol(format!("virtio-mem size is not a number: {v}")))
    }

    /// Asks the guest to plug or unplug memory on the virtio-mem device `id` until `bytes`
    /// are plugged (a multiple of the device's block size, at most its region).
    pub async fn set_virtio_mem_requested(&self, id: &str, bytes: u64) -> Result<()> {
        self.qom_set(
            &format!("/machine/peripheral/{id}"),
            "requested-size",
            json!(bytes),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// -1 means "not reported"; all figures are read.
    #[test]
    fn parses_guest_stats() {
        let v = json!({"stats": {"stats-total-memory": 512u64 << 20,
            "stats-available-memory": 300u64 << 20, "stats-free-memory": -1},
            "last-update": 1234});
        let s = GuestMemoryStats::from_qom(&v).unwrap();
        assert_eq!(s.total, Some(512 << 20));
        assert_eq!(s.available, Some(300 << 20));
        assert_eq!(s.free, None);
        assert_eq!(s.last_update, 1234);
        assert!(GuestMemoryStats::from_qom(&json!({"last-update": 1})).is_err());
    }

    /// `plugged-memory` is optional; `base-memory` is not.
    #[test]
    fn parses_memory_size_summary() {
        let s = MemorySizeSummary::from_qmp(&json!({"base-memory": 256u64 << 20})).unwrap();
        assert_eq!(
            s,
            MemorySizeSummary {
                base: 256 << 20,
                plugged: 0
            }
        );
        let s = MemorySizeSummary::from_qmp(
            &json!({"base-memory": 256u64 << 20, "plugged-memory": 4u64 << 20}),
        )
        .unwrap();
        assert_eq!(s.plugged, 4 << 20);
        assert!(MemorySizeSummary::from_qmp(&json!({})).is_err());
    }
}
