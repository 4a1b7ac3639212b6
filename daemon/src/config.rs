//! Configuration, in stages (DESIGN.md): parse the TOML (serde, unknown keys refused) →
//! validate (pure, every problem named with its line) → resolve (reads the files the
//! configuration points to). The result, [`Config`], is what the rest of the daemon uses.

use id06_protocol::{is_valid_topic_level, Direction, DEFAULT_TOPIC_PREFIX};
use id06_readers::simulated::Script;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A configuration problem: one line, naming the file, the line and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

// ---------------------------------------------------------------------------------------
// Stage 1: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site_id: Spanned<String>,
    terminal_id: Spanned<String>,
    data_dir: Spanned<String>,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default, rename = "reader")]
    readers: Vec<RawReader>,
    #[serde(default)]
    debounce: DebounceSettings,
    #[serde(default)]
    events: EventsSettings,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    blocklist: BlocklistSettings,
    #[serde(default)]
    access: AccessSettings,
    #[serde(default)]
    ledger: LedgerSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: Option<Spanned<String>>,
    client_id: Option<String>,
    username: Option<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    topic_prefix: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReader {
    name: Spanned<String>,
    kind: ReaderKind,
    #[serde(rename = "match")]
    pattern: Option<String>,
    path: Option<String>,
    baud: Option<u32>,
    script: Option<String>,
    poll_ms: Option<u64>,
    direction: DirectionMode,
    address: Option<u8>,
    scbk_file: Option<String>,
    reversed: Option<bool>,
    feedback: Option<FeedbackMode>,
    door_output: Option<u8>,
    open_ms: Option<u32>,
}

/// Whether the gate answers the worker at the reader (light, sound, display).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackMode {
    /// Whatever the reader can do (PC/SC: the ACR122U's LED and buzzer when the reader's
    /// name says ACR122).
    Auto,
    /// PC/SC: the ACR122U's LED and buzzer whatever the reader's name.
    Acr122,
    /// Nothing (another system drives the reader's light).
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<Spanned<String>>,
    password_file: Option<String>,
}

/// `[http]`: the commissioning page and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Where the page is served.
    pub listen: SocketAddr,
    /// A file holding the page's password (HTTP Basic, any user name). Required when
    /// `listen` is not a loopback address.
    pub password_file: Option<PathBuf>,
}

impl HttpSettings {
    /// The password from `password_file` (its first line), if one is configured.
    pub fn read_password(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read [http] password_file {}: {e}", path.display()))?;
        let password = text.lines().next().unwrap_or("").to_string();
        if password.is_empty() {
            return Err(format!(
                "[http] password_file {} is empty: write the page's password on its first line",
                path.display()
            ));
        }
        Ok(Some(password))
    }
}

/// The kind of a reader (contract §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderKind {
    /// A PC/SC reader through pcscd.
    Pcsc,
    /// A PN532 over a serial line (HSU).
    Pn532,
    /// A serial reader that prints each UID as a line of hex.
    Line,
    /// A timeline played by the daemon itself.
    Simulated,
    /// An OSDP door reader on a serial line (RS-485).
    Osdp,
}

/// How a reader's taps get their direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionMode {
    /// Every tap checks in.
    In,
    /// Every tap checks out.
    Out,
    /// A card's taps alternate in/out, persisted; in again after 12 hours.
    Toggle,
}

impl DirectionMode {
    /// The fixed direction, or `None` for toggle.
    pub fn fixed(self) -> Option<Direction> {
        match self {
            DirectionMode::In => Some(Direction::In),
            DirectionMode::Out => Some(Direction::Out),
            DirectionMode::Toggle => None,
        }
    }
}

/// `[debounce]` (contract §4, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebounceSettings {
    /// Absence that ends a presentation.
    pub gone_ms: u64,
    /// Same card, same reader: a new tap sooner than this after the last is a duplicate.
    pub repeat_ms: u64,
    /// Presence changes without a complete read ...
    pub flap_limit: u32,
    /// ... within this window: the card is being waved.
    pub flap_window_ms: u64,
}

impl Default for DebounceSettings {
    fn default() -> Self {
        DebounceSettings {
            gone_ms: 500,
            repeat_ms: 5000,
            flap_limit: 4,
            flap_window_ms: 2000,
        }
    }
}

/// `[events]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSettings {
    /// Delivered events are kept this many days for `events export`.
    pub keep_days: u32,
}

impl Default for EventsSettings {
    fn default() -> Self {
        EventsSettings { keep_days: 14 }
    }
}

/// Which cards a gateway admits besides what the national list says (`[access] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    /// Every card the national list does not deny, except the site's bans.
    #[default]
    Open,
    /// Only the cards on the site's allow list (and not denied by the national list).
    SiteList,
}

/// `[ledger]`: what the ledger confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSettings {
    /// The ledger confirms what it stored on `P/ack`; events are kept and sent again until
    /// it does.
    pub confirm: bool,
    /// An event not confirmed this long after it was last sent is sent again.
    pub resend_after_s: u64,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            confirm: false,
            resend_after_s: 60,
        }
    }
}

/// `[access]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSettings {
    /// `open` or `site_list`.
    pub mode: AccessMode,
}

/// What to do when the blocklist is older than `max_age_hours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenStale {
    /// Decide as usual (the event is flagged).
    Allow,
    /// Deny cards that are not on the list too (the event is flagged).
    Deny,
}

/// `[blocklist]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlocklistSettings {
    /// Older than this the list is stale.
    pub max_age_hours: u64,
    /// What a stale list means for unlisted cards.
    pub when_stale: WhenStale,
    /// Ed25519 public key that updates must be signed with (base64 or hex).
    pub public_key: Option<String>,
    /// `blocklist import` refuses a file that would take more than this share (percent) of
    /// the listed cards off the list, unless told `--allow-shrink`.
    pub import_max_shrink_percent: u8,
}

impl Default for BlocklistSettings {
    fn default() -> Self {
        BlocklistSettings {
            max_age_hours: 48,
            when_stale: WhenStale::Allow,
            public_key: None,
            import_max_shrink_percent: 10,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Stages 2 and 3: validated and resolved.

/// The broker connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// The URL as configured.
    pub url: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
    /// MQTT client id.
    pub client_id: String,
    /// Optional user name.
    pub username: Option<String>,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) for mqtts.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mqtts.
    pub client_cert: Option<PathBuf>,
    /// Client key for mqtts.
    pub client_key: Option<PathBuf>,
    /// Topic prefix.
    pub topic_prefix: String,
}

/// How to talk to one reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverSettings {
    /// PC/SC: the first reader whose name contains `pattern`.
    Pcsc {
        /// Substring of the PC/SC reader name.
        pattern: String,
        /// LED and buzzer of an ACR122U-style reader.
        feedback: FeedbackMode,
    },
    /// PN532 over a serial line.
    Pn532 {
        /// Serial device.
        path: PathBuf,
        /// Baud rate.
        baud: u32,
        /// Poll interval.
        poll: Duration,
    },
    /// Line-based serial reader.
    Line {
        /// Serial device.
        path: PathBuf,
        /// Baud rate.
        baud: u32,
    },
    /// An OSDP reader; readers with the same `path` share the line.
    Osdp {
        /// Serial device (the RS-485 adapter).
        path: PathBuf,
        /// Baud rate (the line's; the same for every reader on it).
        baud: u32,
        /// The reader's OSDP address.
        address: u8,
        /// The secure channel base key's file.
        scbk_file: Option<PathBuf>,
        /// The reader sends the UID's bytes last first.
        reversed: bool,
        /// Feedback at the reader from the local decision.
        feedback: FeedbackMode,
        /// The output pulsed on a granted tap, and for how long (ms).
        door: Option<(u8, u32)>,
    },
    /// A simulated timeline.
    Simulated {
        /// The timeline file.
        script_path: PathBuf,
        /// The parsed timeline.
        script: Script,
        /// Poll interval.
        poll: Duration,
    },
}

/// One configured reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderSettings {
    /// Unique name; in events and topics.
    pub name: String,
    /// Its kind.
    pub kind: ReaderKind,
    /// In, out or toggle.
    pub direction: DirectionMode,
    /// How to reach it.
    pub driver: DriverSettings,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// The site in the ledger.
    pub site_id: String,
    /// This gateway.
    pub terminal_id: String,
    /// The sled database's directory.
    pub data_dir: PathBuf,
    /// The broker.
    pub mqtt: MqttSettings,
    /// The readers, in configuration order (their index is their identity at run time).
    pub readers: Vec<ReaderSettings>,
    /// Debouncing.
    pub debounce: DebounceSettings,
    /// Event retention.
    pub events: EventsSettings,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// `[http]`: the commissioning page.
    pub http: Option<HttpSettings>,
    /// Blocklist policy.
    pub blocklist: BlocklistSettings,
    /// `[access]`: what the site's own list does.
    pub access: AccessSettings,
    /// `[ledger]`: confirmation by the ledger.
    pub ledger: LedgerSettings,
}

/// Where a byte offset lies: 1-based line and column.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct Located<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn at(&self, span: std::ops::Range<usize>, message: impl fmt::Display) -> ConfigError {
        let (line, _) = line_col(self.text, span.start);
        ConfigError(format!("{}:{line}: {message}", self.file.display()))
    }

    fn whole(&self, message: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {message}", self.file.display()))
    }
}

/// Splits `mqtt://host:port` / `mqtts://host:port` (IPv6 hosts in brackets).
fn parse_broker_url(url: &str) -> Result<(String, u16, bool), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "[mqtt] url {url:?} must start with mqtt:// or mqtts://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(format!(
            "[mqtt] url {url:?} must be scheme://host[:port] only (credentials go in username and password_file)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("[mqtt] url {url:?} has an unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("[mqtt] url {url:?} has junk after the host")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("[mqtt] url {url:?} has no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("[mqtt] url {url:?}: {p:?} is not a port number"))?,
    };
    Ok((host, port, tls))
}

/// Resolves `[mqtt]` (relative paths through `resolve`).
fn resolve_mqtt(
    m: &RawMqtt,
    default_client_id: String,
    loc: &Located<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<MqttSettings, ConfigError> {
    let url_spanned = m.url.clone();
    let url = url_spanned
        .as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_string());
    let (host, port, tls) = parse_broker_url(&url).map_err(|m| match &url_spanned {
        Some(s) => loc.at(s.span(), m),
        None => loc.whole(m),
    })?;
    let topic_prefix = match &m.topic_prefix {
        Some(p) => {
            let v = p.get_ref().trim_end_matches('/').to_string();
            if v.is_empty() || v.split('/').any(|lvl| !is_valid_topic_level(lvl)) {
                return Err(loc.at(
                    p.span(),
                    format!(
                        "[mqtt] topic_prefix {:?} must be non-empty topic levels without wildcards",
                        p.get_ref()
                    ),
                ));
            }
            if v.starts_with('$') {
                // Brokers keep topics that start with `$` for themselves ($SYS, $share):
                // they acknowledge what is published there and deliver it to nobody.
                return Err(loc.at(
                    p.span(),
                    format!("[mqtt] topic_prefix {:?} must not start with '$' (brokers reserve those topics; nobody would receive the events)", p.get_ref()),
                ));
            }
            v
        }
        None => DEFAULT_TOPIC_PREFIX.to_string(),
    };
    if !tls && (m.ca_file.is_some() || m.client_cert.is_some() || m.client_key.is_some()) {
        return Err(loc.whole("[mqtt] ca_file, client_cert and client_key need an mqtts:// url"));
    }
    if m.client_cert.is_some() != m.client_key.is_some() {
        return Err(loc.whole("[mqtt] client_cert and client_key go together: set both or neither"));
    }
    if m.password_file.is_some() && m.username.is_none() {
        return Err(loc.whole("[mqtt] password_file needs a username"));
    }
    let mqtt = MqttSettings {
        url,
        host,
        port,
        tls,
        client_id: m.client_id.clone().unwrap_or(default_client_id),
        username: m.username.clone(),
        password_file: m.password_file.as_deref().map(resolve),
        ca_file: m.ca_file.as_deref().map(resolve),
        client_cert: m.client_cert.as_deref().map(resolve),
        client_key: m.client_key.as_deref().map(resolve),
        topic_prefix,
    };
    if mqtt.client_id.is_empty() || mqtt.client_id.len() > 256 {
        return Err(loc.whole("[mqtt] client_id must be 1-256 characters"));
    }
    Ok(mqtt)
}

/// Only what the backend-side commands (`blocklist publish-update`, `publish-snapshot`)
/// use: `[mqtt]` of `path`, a gateway's configuration or a file with nothing else.
pub fn load_broker(path: &Path) -> Result<MqttSettings, ConfigError> {
    #[derive(Deserialize)]
    struct BrokerOnly {
        #[serde(default)]
        mqtt: RawMqtt,
        #[serde(flatten)]
        _rest: toml::Table,
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "cannot read the configuration file {}: {e}",
            path.display()
        ))
    })?;
    let loc = Located {
        file: path,
        text: &text,
    };
    let raw: BrokerOnly = toml::from_str(&text).map_err(|e| match e.span() {
        Some(span) => loc.at(span, e.message().trim()),
        None => loc.whole(e.message().trim()),
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    resolve_mqtt(&raw.mqtt, "id06d-publisher".into(), &loc, &resolve)
}

impl Config {
    /// Reads, validates and resolves a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "cannot read the configuration file {}: {e}",
                path.display()
            ))
        })?;
        Config::from_text(path, &text)
    }

    /// Validates and resolves configuration text as if read from `path` (relative paths are
    /// relative to `path`'s folder).
    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let loc = Located { file: path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => loc.at(span, e.message().trim()),
            None => loc.whole(e.message().trim()),
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        for (key, value) in [("site_id", &raw.site_id), ("terminal_id", &raw.terminal_id)] {
            if !is_valid_topic_level(value.get_ref()) || value.get_ref().contains(':') {
                return Err(loc.at(
                    value.span(),
                    format!(
                        "{key} {:?} must be 1-128 characters without '/', '+', '#', ':' or control characters",
                        value.get_ref()
                    ),
                ));
            }
        }
        if raw.data_dir.get_ref().trim().is_empty() {
            return Err(loc.at(raw.data_dir.span(), "data_dir is empty"));
        }

        // [mqtt]
        let mqtt = resolve_mqtt(
            &raw.mqtt,
            format!("id06d-{}", raw.terminal_id.get_ref()),
            &loc,
            &resolve,
        )?;

        // [debounce]
        let d = raw.debounce;
        if d.gone_ms == 0 || d.gone_ms > 60_000 {
            return Err(loc.whole("[debounce] gone_ms must be between 1 and 60000"));
        }
        if d.repeat_ms > 24 * 3600 * 1000 {
            return Err(loc.whole("[debounce] repeat_ms must be at most one day"));
        }
        if d.flap_limit < 2 {
            return Err(loc.whole("[debounce] flap_limit must be at least 2"));
        }
        if d.flap_window_ms == 0 {
            return Err(loc.whole("[debounce] flap_window_ms must be more than 0"));
        }
        if raw.events.keep_days == 0 || raw.events.keep_days > 3650 {
            return Err(loc.whole("[events] keep_days must be between 1 and 3650"));
        }
        if let Some(k) = &raw.blocklist.public_key {
            crate::lists::signing::parse_public_key(k).map_err(|e| loc.whole(e))?;
        }
        if raw.blocklist.max_age_hours == 0 {
            return Err(loc.whole("[blocklist] max_age_hours must be more than 0"));
        }
        if raw.ledger.resend_after_s == 0 || raw.ledger.resend_after_s > 86_400 {
            return Err(loc.whole("[ledger] resend_after_s must be between 1 and 86400"));
        }
        if raw.blocklist.import_max_shrink_percent > 100 {
            return Err(
                loc.whole("[blocklist] import_max_shrink_percent must be between 0 and 100")
            );
        }

        let metrics_listen = match &raw.metrics.listen {
            None => None,
            Some(s) => Some(s.get_ref().parse::<SocketAddr>().map_err(|_| {
                loc.at(
                    s.span(),
                    format!("[metrics] listen {:?} is not an address:port", s.get_ref()),
                )
            })?),
        };

        let http = match &raw.http.listen {
            None => {
                if raw.http.password_file.is_some() {
                    return Err(loc.whole(
                        "[http] password_file is set but [http] listen is not: set listen (for example \"127.0.0.1:8080\") or remove the section",
                    ));
                }
                None
            }
            Some(s) => {
                let listen = s.get_ref().parse::<SocketAddr>().map_err(|_| {
                    loc.at(
                        s.span(),
                        format!("[http] listen {:?} is not an address:port", s.get_ref()),
                    )
                })?;
                if !listen.ip().is_loopback() && raw.http.password_file.is_none() {
                    return Err(loc.at(
                        s.span(),
                        format!("[http] listen {:?} is reachable from the network: the page shows card UIDs and the gateway's state, so set [http] password_file (a file with the password) or listen on 127.0.0.1", s.get_ref()),
                    ));
                }
                Some(HttpSettings {
                    listen,
                    password_file: raw.http.password_file.as_deref().map(resolve),
                })
            }
        };

        // [[reader]]
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut readers = Vec::with_capacity(raw.readers.len());
        for r in &raw.readers {
            let name = r.name.get_ref().clone();
            let (line, _) = line_col(text, r.name.span().start);
            let here = |m: String| loc.at(r.name.span(), format!("reader {name:?}: {m}"));
            if !is_valid_topic_level(&name) {
                return Err(here(
                    "the name must be 1-128 characters without '/', '+', '#' or control characters"
                        .into(),
                ));
            }
            if let Some(first) = seen.insert(name.clone(), line) {
                return Err(here(format!(
                    "the name is used twice (first on line {first}); reader names must be unique"
                )));
            }
            let unexpected = |key: &str, present: bool| -> Result<(), ConfigError> {
                if present {
                    Err(here(format!(
                        "key `{key}` does not apply to kind \"{}\"",
                        kind_name(r.kind)
                    )))
                } else {
                    Ok(())
                }
            };
            let need = |key: &str, v: &Option<String>| -> Result<String, ConfigError> {
                v.clone()
                    .filter(|s| !s.trim().is_empty())
                    .ok_or_else(|| here(format!("kind \"{}\" needs `{key}`", kind_name(r.kind))))
            };
            let poll = |default: u64| -> Result<Duration, ConfigError> {
                let ms = r.poll_ms.unwrap_or(default);
                if !(10..=10_000).contains(&ms) {
                    return Err(here(format!("poll_ms {ms} must be between 10 and 10000")));
                }
                Ok(Duration::from_millis(ms))
            };
            let baud = |default: u32| -> Result<u32, ConfigError> {
                let b = r.baud.unwrap_or(default);
                if !(300..=4_000_000).contains(&b) {
                    return Err(here(format!("baud {b} must be between 300 and 4000000")));
                }
                Ok(b)
            };
            if r.kind != ReaderKind::Osdp {
                unexpected("address", r.address.is_some())?;
                unexpected("scbk_file", r.scbk_file.is_some())?;
                unexpected("reversed", r.reversed.is_some())?;
            }
            if !matches!(r.kind, ReaderKind::Osdp | ReaderKind::Pcsc) {
                unexpected("feedback", r.feedback.is_some())?;
            }
            if r.kind != ReaderKind::Osdp {
                unexpected("door_output", r.door_output.is_some())?;
                unexpected("open_ms", r.open_ms.is_some())?;
            }
            let driver = match r.kind {
                ReaderKind::Pcsc => {
                    unexpected("path", r.path.is_some())?;
                    unexpected("baud", r.baud.is_some())?;
                    unexpected("script", r.script.is_some())?;
                    unexpected("poll_ms", r.poll_ms.is_some())?;
                    DriverSettings::Pcsc {
                        pattern: need("match", &r.pattern)?,
                        feedback: r.feedback.unwrap_or(FeedbackMode::Auto),
                    }
                }
                ReaderKind::Pn532 => {
                    unexpected("match", r.pattern.is_some())?;
                    unexpected("script", r.script.is_some())?;
                    DriverSettings::Pn532 {
                        path: resolve(&need("path", &r.path)?),
                        baud: baud(115_200)?,
                        poll: poll(100)?,
                    }
                }
                ReaderKind::Line => {
                    unexpected("match", r.pattern.is_some())?;
                    unexpected("script", r.script.is_some())?;
                    unexpected("poll_ms", r.poll_ms.is_some())?;
                    DriverSettings::Line {
                        path: resolve(&need("path", &r.path)?),
                        baud: baud(9600)?,
                    }
                }
                ReaderKind::Osdp => {
                    unexpected("match", r.pattern.is_some())?;
                    unexpected("script", r.script.is_some())?;
                    unexpected("poll_ms", r.poll_ms.is_some())?;
                    let b = baud(9600)?;
                    if ![9600, 19200, 38400, 57600, 115_200, 230_400].contains(&b) {
                        return Err(here(format!(
                            "baud {b}: an OSDP line runs at 9600, 19200, 38400, 57600, 115200 or 230400"
                        )));
                    }
                    if r.feedback == Some(FeedbackMode::Acr122) {
                        return Err(here(
                            "feedback = \"acr122\" is for PC/SC readers; an OSDP reader takes \"auto\" or \"none\"".into(),
                        ));
                    }
                    let address = r.address.unwrap_or(0);
                    if address > 126 {
                        return Err(here(format!(
                            "address {address}: OSDP addresses are 0 to 126"
                        )));
                    }
                    let scbk_file = r.scbk_file.as_deref().map(resolve);
                    if let Some(f) = &scbk_file {
                        id06_readers::osdp::read_scbk(f).map_err(here)?;
                    }
                    if r.open_ms.is_some() && r.door_output.is_none() {
                        return Err(here(
                            "`open_ms` needs `door_output` (the output that opens the door)".into(),
                        ));
                    }
                    let open_ms = r.open_ms.unwrap_or(3000);
                    if !(100..=60_000).contains(&open_ms) {
                        return Err(here(format!(
                            "open_ms {open_ms} must be between 100 and 60000"
                        )));
                    }
                    DriverSettings::Osdp {
                        path: resolve(&need("path", &r.path)?),
                        baud: b,
                        address,
                        scbk_file,
                        reversed: r.reversed.unwrap_or(false),
                        feedback: r.feedback.unwrap_or(FeedbackMode::Auto),
                        door: r.door_output.map(|o| (o, open_ms)),
                    }
                }
                ReaderKind::Simulated => {
                    unexpected("match", r.pattern.is_some())?;
                    unexpected("path", r.path.is_some())?;
                    unexpected("baud", r.baud.is_some())?;
                    let script_path = resolve(&need("script", &r.script)?);
                    let script = Script::load(&script_path)
                        .map_err(|m| here(format!("the simulated timeline: {m}")))?;
                    DriverSettings::Simulated {
                        script_path,
                        script,
                        poll: poll(100)?,
                    }
                }
            };
            readers.push(ReaderSettings {
                name,
                kind: r.kind,
                direction: r.direction,
                driver,
            });
        }

        Ok(Config {
            source: path.to_path_buf(),
            site_id: raw.site_id.into_inner(),
            terminal_id: raw.terminal_id.into_inner(),
            data_dir: resolve(raw.data_dir.get_ref()),
            mqtt,
            readers,
            debounce: d,
            events: raw.events,
            metrics_listen,
            http,
            blocklist: raw.blocklist,
            access: raw.access,
            ledger: raw.ledger,
        })
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let p = |v: &Path| q(&v.display().to_string());
        let _ = writeln!(s, "# effective configuration of {}", self.source.display());
        let _ = writeln!(s, "site_id     = {}", q(&self.site_id));
        let _ = writeln!(s, "terminal_id = {}", q(&self.terminal_id));
        let _ = writeln!(s, "data_dir    = {}", p(&self.data_dir));
        let _ = writeln!(s, "\n[mqtt]");
        let m = &self.mqtt;
        let _ = writeln!(
            s,
            "url          = {}   # host {} port {}{}",
            q(&m.url),
            m.host,
            m.port,
            if m.tls { ", TLS" } else { "" }
        );
        let _ = writeln!(s, "client_id    = {}", q(&m.client_id));
        if let Some(u) = &m.username {
            let _ = writeln!(s, "username     = {}", q(u));
        }
        for (k, v) in [
            ("password_file", &m.password_file),
            ("ca_file", &m.ca_file),
            ("client_cert", &m.client_cert),
            ("client_key", &m.client_key),
        ] {
            if let Some(v) = v {
                let _ = writeln!(s, "{k:<12} = {}", p(v));
            }
        }
        let _ = writeln!(s, "topic_prefix = {}", q(&m.topic_prefix));
        for r in &self.readers {
            let _ = writeln!(s, "\n[[reader]]");
            let _ = writeln!(s, "name      = {}", q(&r.name));
            let _ = writeln!(s, "kind      = {}", q(kind_name(r.kind)));
            match &r.driver {
                DriverSettings::Pcsc { pattern, feedback } => {
                    let _ = writeln!(s, "match     = {}", q(pattern));
                    let _ = writeln!(s, "feedback  = {}", q(feedback_name(*feedback)));
                }
                DriverSettings::Pn532 { path, baud, poll } => {
                    let _ = writeln!(
                        s,
                        "path      = {}\nbaud      = {baud}\npoll_ms   = {}",
                        p(path),
                        poll.as_millis()
                    );
                }
                DriverSettings::Line { path, baud } => {
                    let _ = writeln!(s, "path      = {}\nbaud      = {baud}", p(path));
                }
                DriverSettings::Osdp {
                    path,
                    baud,
                    address,
                    scbk_file,
                    reversed,
                    feedback,
                    door,
                } => {
                    let _ = writeln!(
                        s,
                        "path      = {}\nbaud      = {baud}\naddress   = {address}",
                        p(path)
                    );
                    if let Some(f) = scbk_file {
                        let _ = writeln!(s, "scbk_file = {}   # secure channel required", p(f));
                    }
                    let _ = writeln!(s, "reversed  = {reversed}");
                    let _ = writeln!(s, "feedback  = {}", q(feedback_name(*feedback)));
                    if let Some((o, ms)) = door {
                        let _ = writeln!(s, "door_output = {o}\nopen_ms   = {ms}");
                    }
                }
                DriverSettings::Simulated {
                    script_path,
                    script,
                    poll,
                } => {
                    let _ = writeln!(
                        s,
                        "script    = {}   # {} steps\npoll_ms   = {}",
                        p(script_path),
                        script.steps().len(),
                        poll.as_millis()
                    );
                }
            }
            let dir = match r.direction {
                DirectionMode::In => "in",
                DirectionMode::Out => "out",
                DirectionMode::Toggle => "toggle",
            };
            let _ = writeln!(s, "direction = {}", q(dir));
        }
        let d = &self.debounce;
        let _ = writeln!(
            s,
            "\n[debounce]\ngone_ms        = {}\nrepeat_ms      = {}\nflap_limit     = {}\nflap_window_ms = {}",
            d.gone_ms, d.repeat_ms, d.flap_limit, d.flap_window_ms
        );
        let _ = writeln!(s, "\n[events]\nkeep_days = {}", self.events.keep_days);
        if let Some(l) = self.metrics_listen {
            let _ = writeln!(s, "\n[metrics]\nlisten = {}", q(&l.to_string()));
        }
        if let Some(h) = &self.http {
            let _ = writeln!(s, "\n[http]\nlisten = {}", q(&h.listen.to_string()));
            if let Some(f) = &h.password_file {
                let _ = writeln!(s, "password_file = {}", p(f));
            }
        }
        let b = &self.blocklist;
        let _ = writeln!(
            s,
            "\n[blocklist]\nmax_age_hours = {}\nwhen_stale    = {}",
            b.max_age_hours,
            q(match b.when_stale {
                WhenStale::Allow => "allow",
                WhenStale::Deny => "deny",
            })
        );
        let _ = writeln!(
            s,
            "import_max_shrink_percent = {}",
            b.import_max_shrink_percent
        );
        match &b.public_key {
            Some(k) => {
                let _ = writeln!(s, "public_key    = {}", q(k));
            }
            None => {
                let _ = writeln!(
                    s,
                    "# warning: no public_key: blocklist updates are accepted unsigned"
                );
            }
        }
        let _ = writeln!(
            s,
            "\n[ledger]\nconfirm        = {}\nresend_after_s = {}",
            self.ledger.confirm, self.ledger.resend_after_s
        );
        let _ = writeln!(
            s,
            "\n[access]\nmode = {}",
            q(match self.access.mode {
                AccessMode::Open => "open",
                AccessMode::SiteList => "site_list",
            })
        );
        s
    }
}

/// The configuration spelling of a kind.
fn feedback_name(f: FeedbackMode) -> &'static str {
    match f {
        FeedbackMode::Auto => "auto",
        FeedbackMode::Acr122 => "acr122",
        FeedbackMode::None => "none",
    }
}

/// The configuration's spelling of a reader kind.
pub fn kind_name(kind: ReaderKind) -> &'static str {
    match kind {
        ReaderKind::Pcsc => "pcsc",
        ReaderKind::Pn532 => "pn532",
        ReaderKind::Line => "line",
        ReaderKind::Osdp => "osdp",
        ReaderKind::Simulated => "simulated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
site_id     = "SE-0001"
terminal_id = "gate-north-1"
data_dir    = "data"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[reader]]
name      = "entry"
kind      = "pcsc"
match     = "ACR122"
direction = "in"

[[reader]]
name      = "exit"
kind      = "pn532"
path      = "/dev/ttyUSB0"
direction = "out"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(Path::new("/etc/id06d/id06d.toml"), text)
    }

    #[test]
    fn good_file_resolves_with_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/id06d/data"));
        assert_eq!(c.mqtt.client_id, "id06d-gate-north-1");
        assert_eq!(c.mqtt.topic_prefix, "id06/v1");
        assert_eq!(c.debounce, DebounceSettings::default());
        assert_eq!(c.events.keep_days, 14);
        assert_eq!(c.blocklist.max_age_hours, 48);
        assert_eq!(
            c.readers[1].driver,
            DriverSettings::Pn532 {
                path: "/dev/ttyUSB0".into(),
                baud: 115_200,
                poll: Duration::from_millis(100)
            }
        );
        // The rendering is itself a valid configuration (for the non-simulated readers).
        let again = load(&c.render()).unwrap();
        assert_eq!(again.readers, c.readers);
        assert_eq!(again.mqtt, c.mqtt);
    }

    #[test]
    fn osdp_readers_take_their_keys_with_defaults_and_each_mistake_names_the_key() {
        let osdp = |extra: &str| {
            format!("{GOOD}\n[[reader]]\nname = \"door\"\nkind = \"osdp\"\npath = \"/dev/ttyUSB1\"\ndirection = \"in\"\n{extra}")
        };
        let c = load(&osdp("")).unwrap();
        assert_eq!(
            c.readers[2].driver,
            DriverSettings::Osdp {
                path: "/dev/ttyUSB1".into(),
                baud: 9600,
                address: 0,
                scbk_file: None,
                reversed: false,
                feedback: FeedbackMode::Auto,
                door: None,
            }
        );
        let c = load(&osdp(
            "address = 3\nbaud = 115200\ndoor_output = 1\nfeedback = \"none\"\nreversed = true\n",
        ))
        .unwrap();
        match &c.readers[2].driver {
            DriverSettings::Osdp {
                address,
                baud,
                door,
                feedback,
                reversed,
                ..
            } => {
                assert_eq!(
                    (*address, *baud, *door, *feedback, *reversed),
                    (3, 115_200, Some((1, 3000)), FeedbackMode::None, true)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(c.render().contains("door_output = 1"));
        for (extra, needle) in [
            ("address = 127\n", "address 127"),
            ("baud = 4800\n", "baud 4800"),
            ("open_ms = 2000\n", "`open_ms` needs `door_output`"),
            ("door_output = 0\nopen_ms = 50\n", "open_ms 50"),
            (
                "scbk_file = \"/nonexistent/gate.scbk\"\n",
                "/nonexistent/gate.scbk",
            ),
            (
                "feedback = \"loud\"\n",
                "expected one of `auto`, `acr122`, `none`",
            ),
            (
                "feedback = \"acr122\"\n",
                "feedback = \"acr122\" is for PC/SC readers",
            ),
        ] {
            let e = load(&osdp(extra)).unwrap_err().0;
            assert!(
                e.contains(needle) && e.contains("/etc/id06d/id06d.toml:"),
                "{extra}: {e}"
            );
        }
        let e = load(&GOOD.replace(
            "match     = \"ACR122\"",
            "match     = \"ACR122\"\naddress = 1",
        ))
        .unwrap_err()
        .0;
        assert!(
            e.contains("key `address` does not apply to kind \"pcsc\""),
            "{e}"
        );
    }

    #[test]
    fn the_page_on_loopback_needs_no_password_and_renders_back() {
        let c = load(&format!("{GOOD}\n[http]\nlisten = \"127.0.0.1:8080\"\n")).unwrap();
        let http = c.http.clone().unwrap();
        assert_eq!(http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(http.password_file, None);
        let c = load(&format!(
            "{GOOD}\n[http]\nlisten = \"[::1]:0\"\npassword_file = \"page.pw\"\n"
        ))
        .unwrap();
        let http = c.http.clone().unwrap();
        assert_eq!(
            http.password_file,
            Some(PathBuf::from("/etc/id06d/page.pw"))
        );
        assert_eq!(load(&c.render()).unwrap().http, c.http);
        assert_eq!(load(GOOD).unwrap().http, None);
    }

    #[test]
    fn the_page_on_the_network_without_a_password_is_refused_at_its_line() {
        let e = load(&format!("{GOOD}\n[http]\nlisten = \"0.0.0.0:8080\"\n"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("/etc/id06d/id06d.toml:22:"), "{e}");
        assert!(e.contains("password_file"), "{e}");
        let with = format!(
            "{GOOD}\n[http]\nlisten = \"192.0.2.7:8080\"\npassword_file = \"/etc/id06d/pw\"\n"
        );
        assert!(load(&with).is_ok());
        let e = load(&format!("{GOOD}\n[http]\npassword_file = \"pw\"\n"))
            .unwrap_err()
            .0;
        assert!(e.contains("[http] listen is not"), "{e}");
        let e = load(&format!("{GOOD}\n[http]\nlisten = \"localhost:80\"\n"))
            .unwrap_err()
            .0;
        assert!(
            e.contains(":22:") && e.contains("not an address:port"),
            "{e}"
        );
        let e = load(&format!("{GOOD}\n[http]\nlisen = \"127.0.0.1:1\"\n"))
            .unwrap_err()
            .0;
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn a_typo_names_the_key_and_the_line() {
        let text = GOOD.replace("match     = \"ACR122\"", "mach      = \"ACR122\"");
        let e = load(&text).unwrap_err().0;
        assert!(e.starts_with("/etc/id06d/id06d.toml:12:"), "{e}");
        assert!(e.contains("mach"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn a_wrong_type_names_the_line() {
        let text = GOOD.replace("[mqtt]", "[debounce]\ngone_ms = \"fast\"\n[mqtt]");
        let e = load(&text).unwrap_err().0;
        assert!(e.contains(":7:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_duplicate_reader_name_names_both_lines() {
        let text = GOOD.replace("name      = \"exit\"", "name      = \"entry\"");
        let e = load(&text).unwrap_err().0;
        assert!(e.contains(":16:"), "{e}");
        assert!(e.contains("first on line 10"), "{e}");
    }

    #[test]
    fn kinds_need_their_keys() {
        let text = GOOD.replace("path      = \"/dev/ttyUSB0\"\n", "");
        assert!(load(&text).unwrap_err().0.contains("needs `path`"));
        let text = GOOD.replace("match     = \"ACR122\"", "match = \"A\"\nbaud = 9600");
        assert!(load(&text).unwrap_err().0.contains("`baud` does not apply"));
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://h").unwrap(),
            ("h".into(), 1883, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://h:1").unwrap(),
            ("h".into(), 1, true)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:99").unwrap(),
            ("::1".into(), 99, false)
        );
        for bad in [
            "http://h",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/x",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_urls_take_the_ca_and_client_files_and_plain_urls_refuse_them() {
        let text = GOOD.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtts://broker:8883\"\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"",
        );
        let c = load(&text).unwrap();
        assert!(c.mqtt.tls);
        assert_eq!((c.mqtt.host.as_str(), c.mqtt.port), ("broker", 8883));
        assert!(c.mqtt.ca_file.unwrap().ends_with("ca.pem"));
        let plain = text.replace("mqtts://broker:8883", "mqtt://broker:1883");
        let e = load(&plain).unwrap_err().0;
        assert!(e.contains("need an mqtts:// url"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (from, to, needle) in [
            (
                "terminal_id = \"gate-north-1\"",
                "terminal_id = \"a/b\"",
                "terminal_id",
            ),
            ("[mqtt]", "[debounce]\nflap_limit = 1\n[mqtt]", "flap_limit"),
            ("direction = \"in\"", "direction = \"sideways\"", "sideways"),
            ("kind      = \"pcsc\"", "kind      = \"nfc\"", "nfc"),
            (
                "url = \"mqtt://127.0.0.1:1883\"",
                "url = \"mqtt://127.0.0.1:1883\"\ntopic_prefix = \"$SYS/id06\"",
                "must not start with '$'",
            ),
            (
                "url = \"mqtt://127.0.0.1:1883\"",
                "url = \"mqtt://127.0.0.1:1883\"\ntopic_prefix = \"id06/+/v1\"",
                "without wildcards",
            ),
            ("site_id     = \"SE-0001\"", "site_id = \"SE#1\"", "site_id"),
        ] {
            let e = load(&GOOD.replace(from, to)).unwrap_err().0;
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_missing_timeline_is_reported_with_the_reader() {
        let text = format!(
            "{GOOD}\n[[reader]]\nname = \"demo\"\nkind = \"simulated\"\nscript = \"nope.txt\"\ndirection = \"toggle\"\n"
        );
        let e = load(&text).unwrap_err().0;
        assert!(e.contains("reader \"demo\""), "{e}");
        assert!(e.contains("nope.txt"), "{e}");
    }
}
