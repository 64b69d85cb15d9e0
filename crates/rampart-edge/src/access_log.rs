//! JSON access log: one line per request, written by a dedicated thread so the
//! request path never blocks on I/O and never wakes anything. A request appends its
//! line to one shared, bounded buffer (a short, uncontended lock, no allocation);
//! every few milliseconds the writer swaps the buffer out and writes it in one go.
//! When the writer falls behind and the buffer is full, lines are dropped and
//! counted (`rampart_access_log_dropped_total`).
//!
//! An earlier version queued one `Vec` per line on a channel: the allocation, the
//! free on another thread and the channel cost about 1.5 us of CPU per request at
//! 50k requests/s, more than the rest of the logging together.

use prometheus_client::metrics::counter::Counter;
use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Most bytes of lines waiting for the writer; more are dropped and counted.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// How often the writer drains the buffer: the longest a line waits to be written.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// One request's line. Written by hand rather than through serde: this runs once per
/// request, and the generic serialiser with its escaping and float formatting cost
/// more than the rest of the log path together (measured with callgrind).
pub struct Entry<'a> {
    pub time: SystemTime,
    pub request_id: Plain<'a>,
    pub client_ip: IpAddr,
    pub host: &'a str,
    pub method: Plain<'a>,
    pub path: &'a str,
    pub protocol: Plain<'a>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Microseconds; written as milliseconds with three decimals.
    pub duration_us: u64,
    pub site: Text<'a>,
    pub route: Text<'a>,
    pub upstream: Text<'a>,
    pub attempts: u32,
    pub reason: &'a str,
    /// What a refusal objected to.
    pub detail: Option<&'a str>,
}

impl Entry<'_> {
    /// The JSON object, without the newline.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        write_rfc3339(out, self.time);
        out.push(b'"');
        plain_field(out, b",\"request_id\":\"", self.request_id);
        out.extend_from_slice(b",\"client_ip\":\"");
        write_ip(out, self.client_ip);
        out.push(b'"');
        str_field(out, b",\"host\":", self.host);
        plain_field(out, b",\"method\":\"", self.method);
        str_field(out, b",\"path\":", self.path);
        plain_field(out, b",\"protocol\":\"", self.protocol);
        int_field(out, b",\"status\":", u64::from(self.status));
        int_field(out, b",\"bytes_in\":", self.bytes_in);
        int_field(out, b",\"bytes_out\":", self.bytes_out);
        int_field(out, b",\"duration_ms\":", self.duration_us / 1000);
        let frac = self.duration_us % 1000;
        out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        text_field(out, b",\"site\":", self.site);
        text_field(out, b",\"route\":", self.route);
        text_field(out, b",\"upstream\":", self.upstream);
        int_field(out, b",\"attempts\":", u64::from(self.attempts));
        str_field(out, b",\"reason\":", self.reason);
        if let Some(d) = self.detail {
            str_field(out, b",\"detail\":", d);
        }
        out.push(b'}');
    }
}

/// `key` is the whole `,"name":` literal: one copy, nothing to escape.
///
/// Inlined, so each key is copied with a few stores of its known length rather
/// than a `memcpy` call; the value's escaping stays out of line (one copy of it).
#[inline(always)]
fn str_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    json_str(out, value);
}

/// `key` is the whole `,"name":"` literal, opening quote included; `value` needs no
/// escaping.
#[inline(always)]
fn plain_field(out: &mut Vec<u8>, key: &[u8], value: Plain<'_>) {
    out.extend_from_slice(key);
    out.extend_from_slice(value.0);
    out.push(b'"');
}

#[inline(always)]
fn text_field(out: &mut Vec<u8>, key: &[u8], value: Text<'_>) {
    out.extend_from_slice(key);
    match value {
        Text::Str(s) => json_str(out, s),
        Text::Json(j) => out.extend_from_slice(&j.0),
    }
}

/// A string field's value: text to escape as it is written, or a name from the
/// configuration encoded once when it was loaded.
#[derive(Clone, Copy)]
pub enum Text<'a> {
    Str(&'a str),
    Json(&'a JsonStr),
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(s: &'a str) -> Text<'a> {
        Text::Str(s)
    }
}

/// A string as a JSON string literal, quotes included: for names logged on every
/// request (a route's site and id, a backend's URL), encoded once.
pub struct JsonStr(Box<[u8]>);

impl JsonStr {
    pub fn new(s: &str) -> JsonStr {
        let mut out = Vec::with_capacity(s.len() + 2);
        json_str(&mut out, s);
        JsonStr(out.into_boxed_slice())
    }
}

/// ASCII text that needs no JSON escaping by how it was made (no `"`, `\\` or
/// control character), so the log writes its bytes without looking at them.
#[derive(Clone, Copy)]
pub struct Plain<'a>(&'a [u8]);

impl<'a> Plain<'a> {
    /// `-`: not known.
    pub const UNKNOWN: Plain<'static> = Plain(b"-");

    /// A method is a token (RFC 9110 §5.6.2): `http` refuses any other.
    pub fn method(m: &'a http::Method) -> Plain<'a> {
        Plain(m.as_str().as_bytes())
    }

    /// Hex digits, or the characters [`crate::headers::acceptable_request_id`] allows.
    /// (ASCII, so its bytes need no UTF-8 check either.)
    pub fn request_id(id: &'a crate::headers::RequestId) -> Plain<'a> {
        Plain(id.as_bytes())
    }

    pub fn version(v: http::Version) -> Plain<'static> {
        Plain(match v {
            http::Version::HTTP_09 => b"HTTP/0.9",
            http::Version::HTTP_10 => b"HTTP/1.0",
            http::Version::HTTP_2 => b"HTTP/2",
            http::Version::HTTP_3 => b"HTTP/3",
            _ => b"HTTP/1.1",
        })
    }
}

#[inline(always)]
fn int_field(out: &mut Vec<u8>, key: &[u8], value: u64) {
    out.extend_from_slice(key);
    int(out, value);
}

fn int(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string literal: `"`, `\\` and control characters escaped; other UTF-8 as is.
#[inline(never)]
fn json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
    } else {
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
                _ => out.push(b),
            }
        }
    }
    out.push(b'"');
}

/// Whether `bytes` holds a `"`, a `\\` or a control character (below 0x20). Eight
/// bytes at a time: with `L` = 0x01 in every byte and `H` = 0x80 in every byte,
/// `(x - n*L) & !x & H` is non-zero exactly when some byte of `x` is below `n`
/// (for `n` up to 0x80), and a byte equal to `c` is a zero byte of `x ^ c*L`.
fn needs_escape(bytes: &[u8]) -> bool {
    const L: u64 = 0x0101_0101_0101_0101;
    const H: u64 = 0x8080_8080_8080_8080;
    let flagged = |x: u64| {
        let below = |x: u64, n: u64| x.wrapping_sub(n * L) & !x & H;
        below(x, 0x20) | below(x ^ (u64::from(b'"') * L), 1) | below(x ^ (u64::from(b'\\') * L), 1)
    };
    // Whole words are loaded as they are. A short string is read as two overlapping
    // halves (bytes read twice are checked twice): copying it into a padded word
    // stalled the load that followed the copy's narrower stores (perf: most of the
    // log's time went there).
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([b'a'; 8]));
    let half = |c: &[u8]| u64::from(u32::from_le_bytes(c.try_into().unwrap_or([b'a'; 4])));
    match bytes.len() {
        0 => false,
        1..4 => bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\'),
        n @ 4..=8 => flagged(half(&bytes[..4]) | half(&bytes[n - 4..]) << 32) != 0,
        n => {
            let mut any = 0;
            let mut chunks = bytes.chunks_exact(8);
            for c in &mut chunks {
                any |= flagged(word(c));
            }
            if !chunks.remainder().is_empty() {
                // The last eight bytes, overlapping the last whole chunk.
                any |= flagged(word(&bytes[n - 8..]));
            }
            any != 0
        }
    }
}

pub(crate) fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Into a fixed buffer, then one copy: at most 15 bytes.
            let mut text = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    text[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    text[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                text[n] = b'0' + octet % 10;
                n += 1;
            }
            out.extend_from_slice(&text[..n]);
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

pub struct AccessLog {
    pending: Option<Arc<Pending>>,
    dropped: Counter,
}

/// Lines written by requests, not yet taken by the writer.
struct Pending {
    lines: Mutex<Vec<u8>>,
    /// Tells the writer to finish: set when this log is replaced or dropped.
    closed: AtomicBool,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock can only leave a partial line behind.
        crate::lock(&self.lines)
    }
}

pub enum Target {
    Off,
    Stdout,
    File(PathBuf),
}

impl AccessLog {
    pub fn disabled(dropped: Counter) -> AccessLog {
        AccessLog { pending: None, dropped }
    }

    /// Open the target and start its writer thread.
    pub fn open(target: Target, dropped: Counter) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(AccessLog::disabled(dropped)),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        };
        let pending = Arc::new(Pending {
            lines: Mutex::new(Vec::with_capacity(64 * 1024)),
            closed: AtomicBool::new(false),
        });
        let shared = pending.clone();
        std::thread::Builder::new()
            .name("rampart-access-log".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(64 * 1024);
                loop {
                    // Read before draining: a close seen here means every line
                    // logged before it is in this drain.
                    let finished = shared.closed.load(Ordering::Acquire);
                    std::mem::swap(&mut *shared.lock(), &mut batch);
                    write_out(&mut out, &mut batch);
                    if batch.capacity() > MAX_PENDING / 2 {
                        // After a burst, do not keep a large buffer for good.
                        batch = Vec::with_capacity(64 * 1024);
                    }
                    if finished {
                        return;
                    }
                    std::thread::sleep(DRAIN_EVERY);
                }
            })?;
        Ok(AccessLog {
            pending: Some(pending),
            dropped,
        })
    }

    pub fn enabled(&self) -> bool {
        self.pending.is_some()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some(pending) = &self.pending else { return };
        let mut lines = pending.lock();
        let before = lines.len();
        entry.write_json(&mut lines);
        lines.push(b'\n');
        if lines.len() > MAX_PENDING {
            lines.truncate(before);
            drop(lines);
            self.dropped.inc();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The writer drains what is pending, then exits.
        if let Some(p) = &self.pending {
            p.closed.store(true, Ordering::Release);
        }
    }
}

fn write_out(out: &mut Box<dyn Write + Send>, buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    if out.write_all(buf).and_then(|()| out.flush()).is_err() {
        tracing::warn!("access log write failed");
    }
    buf.clear();
}

thread_local! {
    /// A wall-clock reading and the monotonic instant it was taken at, on this
    /// thread: log times are worked out from the request's own end instant.
    static ANCHOR: std::cell::Cell<Option<(std::time::Instant, SystemTime)>> = const { std::cell::Cell::new(None) };
}

/// The wall-clock time at monotonic instant `at`, from a reading of the system
/// clock taken at most a second before it on this thread (so a step of the system
/// clock shows within a second), without a clock read per request.
pub fn wall_clock(at: std::time::Instant) -> SystemTime {
    ANCHOR.with(|anchor| {
        // One subtraction of instants (each is a checked `timespec` difference).
        if let Some((base, wall)) = anchor.get()
            && let Some(since) = at.checked_duration_since(base)
            && since < Duration::from_secs(1)
        {
            return wall + since;
        }
        let wall = SystemTime::now();
        anchor.set(Some((at, wall)));
        wall
    })
}

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`:
    /// requests within one second share the date arithmetic.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// RFC 3339 UTC timestamp with milliseconds (`2026-11-24T01:02:03.456Z`), without
/// pulling in a date crate.
pub fn write_rfc3339(out: &mut Vec<u8>, t: SystemTime) {
    let now = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *cached = secs;
            *text = format_second(secs);
        }
        out.extend_from_slice(&text[..]);
    });
    let ms = now.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

fn format_second(secs: u64) -> [u8; 19] {
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days);
    let mut text = [0u8; 19];
    let s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    if s.len() == text.len() {
        text.copy_from_slice(s.as_bytes());
    }
    text
}

/// RFC 3339 UTC timestamp with milliseconds, as a string.
pub fn now_rfc3339() -> String {
    let mut out = Vec::with_capacity(24);
    write_rfc3339(&mut out, SystemTime::now());
    String::from_utf8(out).unwrap_or_default()
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_follows_the_monotonic_instant() {
        let t0 = std::time::Instant::now();
        let w0 = wall_clock(t0);
        let read = SystemTime::now();
        assert!(read.duration_since(w0).unwrap_or_default() < Duration::from_secs(1));
        // Within a second of the reading: worked out from it, exactly.
        assert_eq!(
            wall_clock(t0 + Duration::from_millis(250)),
            w0 + Duration::from_millis(250)
        );
        // Later (or earlier) than that: the clock is read again.
        let later = wall_clock(t0 + Duration::from_secs(2));
        assert!(later >= w0 && later.duration_since(w0).unwrap_or_default() < Duration::from_secs(1));
        assert_eq!(
            wall_clock(t0 + Duration::from_millis(2100)),
            later + Duration::from_millis(100)
        );
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(now_rfc3339().len(), 24);
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_763_942_523_004);
        let mut out = Vec::new();
        write_rfc3339(&mut out, t);
        assert_eq!(out, b"2025-11-24T00:02:03.004Z");
    }

    /// Addresses are written as `Display` writes them.
    #[test]
    fn addresses_are_written_as_displayed() {
        let v4 = [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 0, 100, 9],
            [1, 22, 133, 4],
            [99, 100, 101, 199],
        ];
        let v6 = ["::1", "2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"];
        let all = v4
            .into_iter()
            .map(IpAddr::from)
            .chain(v6.iter().map(|a| a.parse::<IpAddr>().unwrap()));
        for ip in all {
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    /// A name encoded once is written as the same text escaped on every line.
    #[test]
    fn encoded_names_match_escaped_text() {
        for name in ["default", "/", "a\"b\\c", "tab\there", "é~/glob/*", ""] {
            let (mut once, mut each) = (Vec::new(), Vec::new());
            let encoded = JsonStr::new(name);
            text_field(&mut once, b",\"site\":", Text::Json(&encoded));
            text_field(&mut each, b",\"site\":", Text::Str(name));
            assert_eq!(once, each, "{name:?}");
        }
    }

    /// What is written without an escape check has nothing to escape.
    #[test]
    fn plain_values_need_no_escaping() {
        let made = crate::headers::RequestId::generate();
        let given = crate::headers::RequestId::given_or_new(Some(&http::HeaderValue::from_static("ab-_.:9Z")));
        assert_eq!(Plain::request_id(&given).0, b"ab-_.:9Z");
        let methods = [http::Method::GET, http::Method::from_bytes(b"PURGE").unwrap()];
        let versions = [
            http::Version::HTTP_09,
            http::Version::HTTP_10,
            http::Version::HTTP_11,
            http::Version::HTTP_2,
            http::Version::HTTP_3,
        ];
        let mut plain: Vec<Plain<'_>> = vec![Plain::request_id(&made), Plain::request_id(&given), Plain::UNKNOWN];
        plain.extend(methods.iter().map(Plain::method));
        for v in versions {
            plain.push(Plain::version(v));
        }
        for p in plain {
            assert!(!p.0.is_empty() && p.0.is_ascii() && !needs_escape(p.0), "{:?}", p.0);
        }
        // A method with a quote or a backslash is not a method.
        assert!(http::Method::from_bytes(b"GE\"T").is_err());
        assert!(http::Method::from_bytes(b"GE\\T").is_err());
    }

    /// A line for the writer tests, told apart by its status and bytes out.
    fn line(status: u16, bytes_out: u64) -> Entry<'static> {
        Entry {
            time: SystemTime::now(),
            request_id: Plain(b"r"),
            client_ip: IpAddr::from([127, 0, 0, 1]),
            host: "h",
            method: Plain(b"GET"),
            path: "/",
            protocol: Plain::version(http::Version::HTTP_11),
            status,
            bytes_in: 0,
            bytes_out,
            duration_us: 1,
            site: "s".into(),
            route: "r".into(),
            upstream: "-".into(),
            attempts: 1,
            reason: "proxied",
            detail: None,
        }
    }

    #[test]
    fn every_line_is_written_when_the_log_is_dropped() {
        let path = std::env::temp_dir().join(format!(
            "rampart-access-{}-{:?}.log",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(Target::File(path.clone()), Counter::default()).unwrap();
        assert!(log.enabled());
        for i in 0..1000u32 {
            log.log(&line(200, u64::from(i)));
        }
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= 1000 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&path);
        let outs: Vec<u64> = lines
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["bytes_out"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(outs, (0..1000).collect::<Vec<u64>>());
    }

    #[test]
    fn every_thread_s_lines_arrive_in_order_or_are_counted_as_dropped() {
        let path = std::env::temp_dir().join(format!("rampart-access-{}-threads.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dropped = Counter::default();
        let log = Arc::new(AccessLog::open(Target::File(path.clone()), dropped.clone()).unwrap());
        // Four threads, one ring each; enough lines at full speed that a ring may
        // fill before the writer drains it.
        let per_thread = 20_000u32;
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        log.log(&line(200 + t, u64::from(i)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        let want = u64::from(per_thread) * 4;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let n = text.lines().count() as u64;
            if n + dropped.get() >= want || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&path);
        let mut last = [None::<u64>; 4];
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let t = (v["status"].as_u64().unwrap() - 200) as usize;
            let out = v["bytes_out"].as_u64().unwrap();
            assert!(last[t].is_none_or(|p| out > p), "thread {t}: {out} after {:?}", last[t]);
            last[t] = Some(out);
        }
        assert_eq!(text.lines().count() as u64 + dropped.get(), want, "written or counted");
    }

    #[test]
    fn escape_check_matches_byte_by_byte() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        for fill in [b'a', 0x7f, 0x80, 0xff, b'!', b'#', b'[', b']'] {
            for len in 1..=24 {
                for at in 0..len {
                    for c in 0..=255u8 {
                        let mut b = vec![fill; len];
                        b[at] = c;
                        assert_eq!(needs_escape(&b), naive(&b), "fill {fill} len {len} at {at} byte {c}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    #[test]
    fn lines_are_json_with_every_field() {
        let entry = Entry {
            time: std::time::UNIX_EPOCH,
            request_id: Plain(b"r1"),
            client_ip: IpAddr::from([10, 0, 0, 254]),
            host: "h\"o\\st\u{1}\n",
            method: Plain(b"GET"),
            path: "/caf\u{e9}",
            protocol: Plain::version(http::Version::HTTP_11),
            status: 200,
            bytes_in: 0,
            bytes_out: 1234,
            duration_us: 12_045,
            site: "s".into(),
            route: "r".into(),
            upstream: "-".into(),
            attempts: 1,
            reason: "proxied",
            detail: Some("waf:x=log"),
        };
        let mut out = Vec::new();
        entry.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["client_ip"], "10.0.0.254");
        assert_eq!(v["host"], "h\"o\\st\u{1}\n");
        assert_eq!(v["path"], "/caf\u{e9}");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_out"], 1234);
        assert_eq!(v["duration_ms"].as_f64(), Some(12.045));
        assert_eq!(v["detail"], "waf:x=log");
        assert_eq!(v.as_object().map(|o| o.len()), Some(17));
        let entry = Entry {
            client_ip: "2001:db8::1".parse().unwrap(),
            detail: None,
            duration_us: 7,
            ..entry
        };
        out.clear();
        entry.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["client_ip"], "2001:db8::1");
        assert_eq!(v["duration_ms"].as_f64(), Some(0.007));
        assert!(v.get("detail").is_none());
    }
}
