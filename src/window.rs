//! Window adequacy: is `ttl_secs` long enough for the duplicates this stream
//! carries? Every duplicate has an age (now − its key's first claim, from the
//! store row or the recent cache); a duplicate that arrives after the TTL is
//! invisible as such, so the filter keeps the keys that expired recently
//! ([`crate::filter::ExpiredKeys`]) and counts the `new` events that match one.
//!
//! - [`First`]: what a duplicate decision knows of its key's first occurrence
//!   (claim time, and position when known), small and `Copy`.
//! - [`Window`]: the counters read back from `/metrics`, and the one-line
//!   advice `kdedup stats` prints.
//! - [`fetch_metrics`]: a plain HTTP GET of a running instance's `/metrics`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

/// Where a key's first occurrence was read from (its claimant's position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The topic's name, interned for the life of the process.
    pub topic: &'static str,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

impl Origin {
    /// `None` when the topic name cannot be kept (see `intern`).
    pub fn of(position: &crate::event::Position) -> Option<Origin> {
        Some(Origin { topic: intern(&position.topic)?, partition: position.partition, offset: position.offset })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// A duplicate's first occurrence: when its key was first claimed (its row's
/// TTL counts from there) and, when known, where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct First {
    /// Milliseconds since the epoch.
    pub claimed_at_ms: u64,
    /// Where it was claimed, when the topic name could be kept.
    pub origin: Option<Origin>,
}

impl First {
    /// The first occurrence claimed at `claimed_at_ms` from `position`.
    pub fn new(claimed_at_ms: u64, position: &crate::event::Position) -> First {
        First { claimed_at_ms, origin: Origin::of(position) }
    }
}

/// Most distinct topic names kept for [`Origin`]s; past this, origins are unknown.
const TOPICS_MAX: usize = 4096;

/// A `'static` copy of a topic name, so that decisions stay `Copy`. Each
/// distinct name is kept once for the life of the process; topic names are
/// bounded (those of the cluster), and past `TOPICS_MAX` (4,096) of them this
/// answers `None` rather than grow.
pub fn intern(topic: &str) -> Option<&'static str> {
    static TOPICS: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut topics = TOPICS.lock().unwrap_or_else(|p| p.into_inner());
    let topics = topics.get_or_insert_with(HashSet::new);
    if let Some(&t) = topics.get(topic) {
        return Some(t);
    }
    if topics.len() >= TOPICS_MAX {
        return None;
    }
    let t: &'static str = Box::leak(topic.to_string().into_boxed_str());
    topics.insert(t);
    Some(t)
}

/// The window-adequacy counters of one instance, summed over topics.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Window {
    /// The configured TTL, in seconds.
    pub ttl_secs: f64,
    /// Duplicates caught.
    pub duplicates: f64,
    /// Duplicates older than 90% of the TTL.
    pub near_expiry: f64,
    /// `new` events whose key expired within the last TTL (an estimate).
    pub expired_key_hits: f64,
    /// Sum and count of `kdedup_duplicate_age_seconds`.
    pub age_sum_secs: f64,
    /// How long this process has watched (now − `process_start_time_seconds`); `None` when
    /// the scrape does not say (the process collector reads `/proc`, Linux only).
    pub observed_secs: Option<f64>,
}

impl Window {
    /// Reads the counters from Prometheus text (a scrape of `/metrics`) taken now.
    pub fn from_metrics(text: &str) -> Window {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Window::from_metrics_at(text, now)
    }

    /// Reads the counters from Prometheus text taken at `now_secs` (Unix seconds).
    pub fn from_metrics_at(text: &str, now_secs: f64) -> Window {
        let start = text.lines().find_map(|l| {
            let value = l.strip_prefix("process_start_time_seconds ")?;
            value.trim().parse::<f64>().ok().filter(|s| *s > 0.0)
        });
        let sum = |name: &str, only: Option<(&str, &str)>| -> f64 {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
                    if metric != name {
                        return None;
                    }
                    if let Some((k, v)) = only {
                        if !labels.contains(&format!("{k}=\"{v}\"")) {
                            return None;
                        }
                    }
                    value.parse::<f64>().ok()
                })
                .sum::<f64>()
                // An empty sum of floats is -0.0, which would print as "-0.0%".
                + 0.0
        };
        Window {
            ttl_secs: sum("kdedup_ttl_seconds", None),
            duplicates: sum("kdedup_records_total", Some(("outcome", "duplicate"))),
            near_expiry: sum("kdedup_duplicates_near_expiry_total", None),
            expired_key_hits: sum("kdedup_expired_key_hits_total", None),
            age_sum_secs: sum("kdedup_duplicate_age_seconds_sum", None),
            observed_secs: start.map(|s| (now_secs - s).max(0.0)),
        }
    }

    /// Share of the duplicates seen that the TTL caught (the rest arrived after
    /// their key expired); `None` before any.
    pub fn coverage(&self) -> Option<f64> {
        let all = self.duplicates + self.expired_key_hits;
        (all > 0.0).then(|| self.duplicates / all)
    }

    /// Share of the duplicates caught that arrived within the last 10% of the TTL.
    pub fn near_expiry_share(&self) -> Option<f64> {
        (self.duplicates > 0.0).then(|| self.near_expiry / self.duplicates)
    }

    /// Whether the counters can tell that the TTL is long enough: a duplicate that arrives
    /// after its key expired is seen (as an expired-key hit) only for keys this process
    /// watched expire, so only once it has run for a whole TTL. Before that, "long enough"
    /// would be a guess (one minute into a 24 h TTL, nothing can have expired yet).
    pub fn can_judge(&self) -> bool {
        self.observed_secs.is_some_and(|o| o >= self.ttl_secs)
    }

    /// One line for a person: how much of the duplicate traffic the TTL covers,
    /// and what to do about it. "Long enough" only once [`Window::can_judge`]; a
    /// TTL already shown too short is said so at once.
    pub fn advice(&self) -> String {
        let pct = |r: f64| {
            let p = r * 100.0;
            if p > 99.9 && p < 100.0 {
                "99.9".to_string()
            } else {
                format!("{p:.1}")
            }
        };
        let (Some(coverage), near) = (self.coverage(), self.near_expiry_share()) else {
            return format!("no duplicates seen yet; ttl_secs = {} (nothing to judge the window by)", self.ttl_secs);
        };
        let mut line = format!(
            "ttl_secs covers {}% of duplicates seen; {}% arrived within 10% of expiry",
            pct(coverage),
            pct(near.unwrap_or(0.0))
        );
        if self.expired_key_hits > 0.0 || near.is_some_and(|n| n > 0.01) {
            line.push_str(&format!(
                "; raise ttl_secs (now {}): {} duplicates arrived after their key expired",
                self.ttl_secs, self.expired_key_hits
            ));
        } else if !self.can_judge() {
            // No running figure here (the uptime is `observed_secs` in `stats --json`): the
            // line stays the same from one scrape to the next.
            line.push_str(&format!(
                "; too early to judge whether ttl_secs = {} is long enough: a duplicate that arrives after its \
                 key expired shows only once this process has run for a whole TTL",
                self.ttl_secs,
            ));
        } else {
            line.push_str(&format!("; ttl_secs = {} is long enough", self.ttl_secs));
        }
        line
    }
}

/// GETs `url` (`http://host:port[/path]`, default path `/metrics`) and returns
/// the body. Plain HTTP only: the metrics listener serves nothing else.
pub fn fetch_metrics(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = match rest.find('/') {
        Some(i) if i + 1 < rest.len() => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], "/metrics"),
        None => (rest, "/metrics"),
    };
    let timeout = Duration::from_secs(10);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| anyhow::anyhow!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host} resolves to no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach kdedup's metrics at {host}: {e} (is `kdedup run` up, with [metrics] listen there?)"
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        anyhow::bail!("GET {url} answered {}", head.lines().next().unwrap_or("nothing"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_from_a_scrape() {
        let text = "# HELP x\n\
            kdedup_ttl_seconds 3600\n\
            kdedup_records_total{outcome=\"duplicate\",topic=\"a\"} 900\n\
            kdedup_records_total{outcome=\"duplicate\",topic=\"b\"} 98\n\
            kdedup_records_total{outcome=\"new\",topic=\"a\"} 5000\n\
            kdedup_duplicates_near_expiry_total{topic=\"a\"} 2\n\
            kdedup_expired_key_hits_total{topic=\"a\"} 1\n\
            kdedup_expired_key_hits_total{topic=\"b\"} 1\n";
        let w = Window::from_metrics(text);
        assert_eq!((w.duplicates, w.near_expiry, w.expired_key_hits, w.ttl_secs), (998.0, 2.0, 2.0, 3600.0));
        assert_eq!(w.coverage(), Some(0.998));
        assert_eq!(
            w.advice(),
            "ttl_secs covers 99.8% of duplicates seen; 0.2% arrived within 10% of expiry; raise ttl_secs (now \
             3600): 2 duplicates arrived after their key expired"
        );
        let quiet = Window { ttl_secs: 60.0, duplicates: 10.0, observed_secs: Some(60.0), ..Window::default() };
        assert_eq!(
            quiet.advice(),
            "ttl_secs covers 100.0% of duplicates seen; 0.0% arrived within 10% of expiry; ttl_secs = 60 is long enough"
        );
        assert!(Window::default().advice().starts_with("no duplicates seen yet"));
    }

    #[test]
    fn one_minute_into_a_day_long_ttl_is_too_early_to_judge() {
        let scrape = |started: f64| {
            format!(
                "kdedup_ttl_seconds 86400\n\
                 kdedup_records_total{{outcome=\"duplicate\",topic=\"a\"}} 40\n\
                 process_start_time_seconds {started}\n"
            )
        };
        let now = 1_796_400_000.0;
        let early = Window::from_metrics_at(&scrape(now - 60.0), now);
        assert_eq!(early.observed_secs, Some(60.0));
        assert!(!early.can_judge());
        assert_eq!(
            early.advice(),
            "ttl_secs covers 100.0% of duplicates seen; 0.0% arrived within 10% of expiry; too early to judge \
             whether ttl_secs = 86400 is long enough: a duplicate that arrives after its key expired shows only \
             once this process has run for a whole TTL"
        );
        let day = Window::from_metrics_at(&scrape(now - 86_400.0), now);
        assert!(day.advice().ends_with("; ttl_secs = 86400 is long enough"), "{}", day.advice());
        // Evidence that the TTL is too short needs no wait.
        let short = Window { expired_key_hits: 3.0, ..early };
        assert!(short.advice().contains("raise ttl_secs"), "{}", short.advice());
        let unknown = Window { observed_secs: None, ..day };
        assert!(unknown.advice().contains("too early to judge"), "{}", unknown.advice());
    }

    #[test]
    fn topics_are_interned_once() {
        let a = intern("orders").unwrap();
        let b = intern(&String::from("orders")).unwrap();
        assert!(std::ptr::eq(a, b));
    }
}
