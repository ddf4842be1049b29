//! Integration services from the host side: pings the guest agent once a second for the
//! heartbeat and refreshes the guest facts (OS, kernel, host name, addresses).

use agent::client::AgentClient;
use agent::heartbeat::Heartbeat;
use api::GuestInfo;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Heartbeat is `lost` after this much silence from an agent that answered before.
const LOST_AFTER: Duration = Duration::from_secs(5);

/// What the worker knows about the guest.
pub struct GuestState {
    /// Ping outcomes.
    pub heartbeat: Heartbeat,
    /// Facts from the agent.
    pub info: Option<GuestInfo>,
    /// Unix ns of the first answered ping.
    pub first_answer_ns: Option<u64>,
}

impl GuestState {
    /// Nothing known yet.
    pub fn new() -> Self {
        GuestState {
            heartbeat: Heartbeat::new(LOST_AFTER),
            info: None,
            first_answer_ns: None,
        }
    }

    /// Heartbeat in API terms.
    pub fn heartbeat_now(&self) -> api::HeartbeatState {
        match self.heartbeat.state(Instant::now()) {
            agent::heartbeat::HeartbeatState::Ok => api::HeartbeatState::Ok,
            agent::heartbeat::HeartbeatState::Lost => api::HeartbeatState::Lost,
            agent::heartbeat::HeartbeatState::NoContact => api::HeartbeatState::NoContact,
        }
    }
}

fn lock(s: &Mutex<GuestState>) -> std::sync::MutexGuard<'_, GuestState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pings forever; refreshes facts on first contact and every 10 s.
pub async fn heartbeat_loop(client: Arc<AgentClient>, state: Arc<Mutex<GuestState>>) {
    let mut last_info: Option<Instant> = None;
    let mut synced_time = false;
    loop {
        let started = Instant::now();
        // Before first contact, ping often with a short timeout so the first heartbeat is seen
        // promptly after the agent starts; afterwards once a second.
        let contacted = lock(&state).first_answer_ns.is_some();
        let (timeout, interval) = if contacted {
            (Duration::from_secs(2), Duration::from_secs(1))
        } else {
            (Duration::from_millis(600), Duration::from_millis(200))
        };
        let ok = tokio::time::timeout(timeout, client.ping())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if !ok {
            // Force a fresh guest-sync on the next attempt.
            client.disconnect().await;
        }
        {
            let mut s = lock(&state);
            if ok && s.first_answer_ns.is_none() {
                s.first_answer_ns = Some(api::worker::now_ns());
            }
            if let Some((old, new)) = s.heartbeat.observe(Instant::now(), ok) {
                tracing::info!("heartbeat {old} -> {new}");
            }
        }
        if ok && last_info.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            if let Some(info) = collect_info(&client).await {
                lock(&state).info = Some(info);
                last_info = Some(Instant::now());
            }
            if !synced_time {
                // Time sync: set the guest clock from the host once per contact.
                synced_time = client.set_time(Some(now_ns())).await.is_ok();
            }
        }
        if !ok {
            synced_time = false;
        }
        let spent = started.elapsed();
        tokio::time::sleep(interval.saturating_sub(spent)).await;
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

async fn collect_info(client: &AgentClient) -> Option<GuestInfo> {
    let agent_info = client.info().await.ok()?;
    let vireo = agent_info
        .supported_commands
        .iter()
        .any(|c| c.name.starts_with("vireo-"));
    let os = client.osinfo().await.ok();
    let hostname = client.hostname().await.ok();
    let ifaces = client.interfaces().await.unwrap_or_default();
    let mut ips = Vec::new();
    for i in ifaces.iter().filter(|i| i.name != "lo") {
        for a in i.ip_addresses.iter().flatten() {
            ips.push(format!("{}/{}", a.ip_address, a.prefix));
        }
    }
    Some(GuestInfo {
        agent: Some(format!(
            "{} {}",
            if vireo { "vireo-guest" } else { "qemu-ga" },
            agent_info.version
        )),
        os: os
            .as_ref()
            .and_then(|o| o.pretty_name.clone().or_else(|| o.name.clone())),
        kernel: os.as_ref().and_then(|o| o.kernel_release.clone()),
        hostname,
        ip_addresses: ips,
    })
}
