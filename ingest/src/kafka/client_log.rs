//! librdkafka's own log lines and errors, collapsed while they repeat.
//!
//! A client whose brokers cannot be reached hears of it from librdkafka at
//! every retry: the connect failure, the transport error, "all brokers
//! down", and for a consumer the same error again as an event from `poll`,
//! about 45 lines a second for one trigger. [`KafkaLog`] shows the first
//! line of each kind at once, then at most one per [`REPEAT_WINDOW`] saying
//! how many like it it held back, so that the log still says what is wrong
//! (and keeps saying it) without burying everything else. Every line names
//! the client (`client`: which trigger, sink or worker) and the servers it
//! was given.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// At most one line of a kind per this long, after the first.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(30);

/// Kinds remembered at most; past it, kinds not seen for a window are
/// forgotten (a line that keeps changing cannot grow the map for ever).
const MAX_KINDS: usize = 256;

/// The log of one Kafka client (see the module docs).
#[derive(Debug)]
pub struct KafkaLog {
    client: String,
    servers: String,
    window: Duration,
    kinds: Mutex<HashMap<String, Kind>>,
}

#[derive(Debug)]
struct Kind {
    shown: Instant,
    held: u64,
}

/// What a line that is shown says about the ones held back before it.
#[derive(Debug, PartialEq, Eq)]
pub struct Shown {
    /// Lines of the same kind not shown since the last one was.
    pub held: u64,
}

impl KafkaLog {
    /// The log of `client` (say `trigger orders-1`), connected to `servers`.
    pub fn new(client: impl Into<String>, servers: impl Into<String>) -> Self {
        Self::with_window(client, servers, REPEAT_WINDOW)
    }

    /// The same with another repeat window.
    pub fn with_window(
        client: impl Into<String>,
        servers: impl Into<String>,
        window: Duration,
    ) -> Self {
        Self {
            client: client.into(),
            servers: servers.into(),
            window,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line of `kind` is shown at `now` (and how many were held
    /// back before it), or held back.
    pub fn admit(&self, kind: &str, now: Instant) -> Option<Shown> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = kinds.get_mut(kind) {
            if now.saturating_duration_since(k.shown) < self.window {
                k.held += 1;
                return None;
            }
            let held = std::mem::take(&mut k.held);
            k.shown = now;
            return Some(Shown { held });
        }
        if kinds.len() >= MAX_KINDS {
            let window = self.window;
            kinds.retain(|_, k| now.saturating_duration_since(k.shown) < window);
        }
        kinds.insert(
            kind.to_owned(),
            Kind {
                shown: now,
                held: 0,
            },
        );
        Some(Shown { held: 0 })
    }

    /// One of librdkafka's log lines (facility `fac`).
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // The kind: the facility and the message up to its parenthesis,
        // which holds what changes between repeats ("after 0ms in state
        // CONNECT, 3 identical error(s) suppressed").
        let stem = message.split('(').next().unwrap_or(message).trim_end();
        let Some(shown) = self.admit(&format!("log {fac} {stem}"), Instant::now()) else {
            return;
        };
        let held = held_note(&shown);
        let (client, servers) = (&self.client, &self.servers);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", %client, %servers, "librdkafka {fac}: {message}{held}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", %client, %servers, "librdkafka {fac}: {message}{held}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", %client, %servers, "librdkafka {fac}: {message}{held}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", %client, %servers, "librdkafka {fac}: {message}{held}")
            }
        }
    }

    /// A client-wide error from librdkafka, or one a consumer's `poll`
    /// returned: both count as one kind per error code, so the same outage
    /// reported both ways shows once.
    pub fn error(&self, error: &KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let Some(shown) = self.admit(&format!("error {}", error_kind(error)), Instant::now())
        else {
            return;
        };
        let held = held_note(&shown);
        let (client, servers) = (&self.client, &self.servers);
        match code {
            Some(RDKafkaErrorCode::AllBrokersDown) => tracing::error!(
                %client, %servers,
                "no Kafka broker of {servers} can be reached ({reason}); librdkafka keeps retrying{held}"
            ),
            _ if reason.is_empty() => {
                tracing::error!(%client, %servers, "Kafka client error: {error}{held}")
            }
            _ => tracing::error!(%client, %servers, "Kafka client error: {error}: {reason}{held}"),
        }
    }
}

/// The kind of a Kafka error, for logs and metrics: librdkafka's error
/// code (`AllBrokersDown`), else the error's own words.
pub fn error_kind(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => error.to_string(),
    }
}

fn held_note(shown: &Shown) -> String {
    match shown.held {
        0 => String::new(),
        1 => " (1 more like it held back)".into(),
        n => format!(" ({n} more like it held back)"),
    }
}

/// A client context that only routes librdkafka's logs and errors through
/// a [`KafkaLog`]: for producers and consumers that need nothing else.
#[derive(Debug)]
pub struct LoggedContext {
    /// Where the client's logs and errors go.
    pub log: KafkaLog,
}

impl LoggedContext {
    /// The context of `client` (say `on-failure sink`), connected to
    /// `servers`.
    pub fn new(client: impl Into<String>, servers: impl Into<String>) -> Self {
        Self {
            log: KafkaLog::new(client, servers),
        }
    }
}

impl ClientContext for LoggedContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }
}

impl ConsumerContext for LoggedContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_kind_shows_then_one_per_window_with_the_count_held() {
        let log = KafkaLog::with_window("t", "s", Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(log.admit("a", t0), Some(Shown { held: 0 }));
        for s in 1..30 {
            assert_eq!(log.admit("a", t0 + Duration::from_secs(s)), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(
            log.admit("b", t0 + Duration::from_secs(1)),
            Some(Shown { held: 0 })
        );
        assert_eq!(
            log.admit("a", t0 + Duration::from_secs(30)),
            Some(Shown { held: 29 })
        );
        assert_eq!(log.admit("a", t0 + Duration::from_secs(31)), None);
        assert_eq!(
            log.admit("a", t0 + Duration::from_secs(90)),
            Some(Shown { held: 1 })
        );
    }

    #[test]
    fn kinds_not_seen_for_a_window_are_forgotten_past_the_bound() {
        let log = KafkaLog::with_window("t", "s", Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..MAX_KINDS {
            log.admit(&format!("k{i}"), t0);
        }
        let later = t0 + Duration::from_secs(2);
        assert_eq!(log.admit("new", later), Some(Shown { held: 0 }));
        assert_eq!(log.kinds.lock().unwrap().len(), 1);
    }
}
