//! The gateway's state in one place: what `P/status` says, what the commissioning page
//! shows and what `/metrics` counts are read here, from the live objects, when asked.

use crate::config::AccessMode;
use crate::lists::blocklist::Blocklist;
use crate::lists::site_list::SiteList;
use crate::ops::clock::clock_synced;
use crate::shared::{Counters, Shared};
use crate::storage::outbox::Outbox;
use id06_protocol::{DenyReason, GatewayStatus, ReaderStatus, UtcMillis};
use serde::Serialize;
use std::sync::Arc;

/// Handles on everything the state is read from. Cheap to clone.
#[derive(Clone)]
pub struct StatusSource {
    /// Counters and reader states.
    pub shared: Arc<Shared>,
    /// Depth, seqs, ledger confirmations.
    pub outbox: Outbox,
    /// The national list.
    pub blocklist: Blocklist,
    /// The site's own list.
    pub site_list: SiteList,
    /// When this process started.
    pub started_at: UtcMillis,
    /// `[ledger] confirm`.
    pub ledger_confirm: bool,
    /// `[blocklist] max_age_hours`.
    pub max_age_hours: u64,
    /// `[access] mode`.
    pub access_mode: AccessMode,
    /// `site_id`.
    pub site_id: String,
    /// `terminal_id`.
    pub terminal_id: String,
}

/// What `P/status` says, from the live objects.
pub fn gateway_status(
    shared: &Shared,
    outbox: &Outbox,
    blocklist: &Blocklist,
    started_at: UtcMillis,
    ledger_confirm: bool,
    max_age_hours: u64,
) -> GatewayStatus {
    let index = blocklist.index();
    let now = UtcMillis::now();
    GatewayStatus {
        online: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at,
        stream: outbox.stream(),
        last_seq: outbox.last_seq(),
        blocklist_version: index.version,
        blocklist_age_s: index.age_s(now),
        outbox_depth: outbox.depth(),
        ledger_confirmed_seq: ledger_confirm
            .then(|| outbox.confirmed_seq(&outbox.stream()).ok())
            .flatten(),
        ledger_unconfirmed: ledger_confirm.then(|| outbox.unconfirmed()),
        clock_synced: clock_synced(),
        blocklist_stale: index.is_stale(now, max_age_hours),
        blocklist_gap: shared.blocklist_gap.lock().ok().and_then(|g| *g),
        storage_error: shared.storage_error.lock().ok().and_then(|e| e.clone()),
        storage_loss: shared.storage_loss.lock().ok().and_then(|e| e.clone()),
    }
}

/// The commissioning page's view: `P/status` plus what an installer at the gate checks.
#[derive(Debug, Serialize)]
pub struct PageStatus {
    /// `site_id`.
    pub site_id: String,
    /// `terminal_id`.
    pub terminal_id: String,
    /// What `P/status` says.
    pub gateway: GatewayStatus,
    /// The publishing session is connected to the broker.
    pub broker_connected: bool,
    /// Seconds the oldest waiting event has waited (`null`: none waits).
    pub oldest_waiting_s: Option<u64>,
    /// `[ledger] confirm`.
    pub ledger_confirm: bool,
    /// The national list.
    pub blocklist: ListView,
    /// The site's own list.
    pub site_list: SiteView,
    /// Every reader, in configuration order.
    pub readers: Vec<ReaderView>,
    /// Counts since start.
    pub counts: CountsView,
}

/// The national list on the page.
#[derive(Debug, Serialize)]
pub struct ListView {
    /// Version in force (0: none yet).
    pub version: u64,
    /// Listed cards.
    pub cards: usize,
    /// Seconds since it was confirmed (`null`: never).
    pub age_s: Option<u64>,
    /// Older than `max_age_hours`.
    pub stale: bool,
    /// `[blocklist] max_age_hours`.
    pub max_age_hours: u64,
}

/// The site list on the page.
#[derive(Debug, Serialize)]
pub struct SiteView {
    /// Version in force (0: never imported).
    pub version: u64,
    /// Cards banned from the site.
    pub banned: usize,
    /// Cards on the allow list.
    pub allowed: usize,
    /// `open` or `site_list`.
    pub mode: &'static str,
}

/// One reader on the page.
#[derive(Debug, Serialize)]
pub struct ReaderView {
    /// Its configured name.
    pub name: String,
    /// What `P/reader/{name}` says.
    #[serde(flatten)]
    pub status: ReaderStatus,
}

/// Counts since start.
#[derive(Debug, Serialize)]
pub struct CountsView {
    /// Taps recorded.
    pub taps: u64,
    /// Taps granted.
    pub granted: u64,
    /// Taps denied.
    pub denied: u64,
    /// Presentations suppressed as duplicates.
    pub duplicates: u64,
}

impl StatusSource {
    /// What `P/status` says.
    pub fn gateway(&self) -> GatewayStatus {
        gateway_status(
            &self.shared,
            &self.outbox,
            &self.blocklist,
            self.started_at,
            self.ledger_confirm,
            self.max_age_hours,
        )
    }

    /// Whether the publishing session is connected.
    pub fn broker_connected(&self) -> bool {
        self.shared
            .broker_connected
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Seconds the oldest waiting event has waited, if one waits.
    pub fn oldest_waiting_s(&self, now: UtcMillis) -> Option<u64> {
        self.outbox
            .oldest_pending()
            .ok()
            .flatten()
            .map(|(_, at)| ((now.as_millis() - at.as_millis()).max(0) / 1000) as u64)
    }

    /// Whether taps cannot be stored now.
    pub fn storage_error(&self) -> bool {
        self.shared
            .storage_error
            .lock()
            .map(|e| e.is_some())
            .unwrap_or(true)
    }

    /// The page's view.
    pub fn page(&self) -> PageStatus {
        let now = UtcMillis::now();
        let index = self.blocklist.index();
        let site = self.site_list.index();
        let (banned, allowed) = site.counts();
        let c = &self.shared.counters;
        PageStatus {
            site_id: self.site_id.clone(),
            terminal_id: self.terminal_id.clone(),
            gateway: self.gateway(),
            broker_connected: self.broker_connected(),
            oldest_waiting_s: self.oldest_waiting_s(now),
            ledger_confirm: self.ledger_confirm,
            blocklist: ListView {
                version: index.version,
                cards: index.len(),
                age_s: index.age_s(now),
                stale: index.is_stale(now, self.max_age_hours),
                max_age_hours: self.max_age_hours,
            },
            site_list: SiteView {
                version: site.version,
                banned,
                allowed,
                mode: match self.access_mode {
                    AccessMode::Open => "open",
                    AccessMode::SiteList => "site_list",
                },
            },
            readers: self
                .shared
                .reader_states()
                .into_iter()
                .map(|(name, status)| ReaderView { name, status })
                .collect(),
            counts: CountsView {
                taps: Counters::get(&c.taps),
                granted: Counters::get(&c.granted),
                denied: DenyReason::ALL
                    .iter()
                    .map(|r| Counters::get(c.denied_for(*r)))
                    .sum(),
                duplicates: Counters::get(&c.duplicates),
            },
        }
    }
}
