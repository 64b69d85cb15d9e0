//! JSON access log: one line per request, written by a dedicated thread so the
//! request path never blocks on I/O and never wakes anything: it only pushes the
//! line onto a bounded queue, which the writer drains every few milliseconds and
//! writes in one go. When the writer falls behind and the queue is full, lines are
//! dropped and counted (`rampart_access_log_dropped_total`).

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TryRecvError, sync_channel};
use std::time::Duration;

const QUEUE: usize = 64 * 1024;
/// How often the writer drains the queue: the longest a line waits to be written.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

#[derive(Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client_ip: String,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub site: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub attempts: u32,
    pub reason: &'a str,
    /// What a refusal objected to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Counter,
    /// Tells the writer to finish: set when this log is replaced or dropped.
    closed: Arc<AtomicBool>,
}

pub enum Target {
    Off,
    Stdout,
    File(PathBuf),
}

impl AccessLog {
    pub fn disabled(dropped: Counter) -> AccessLog {
        AccessLog {
            tx: None,
            dropped,
            closed: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Open the target and start its writer thread.
    pub fn open(target: Target, dropped: Counter) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(AccessLog::disabled(dropped)),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        std::thread::Builder::new()
            .name("rampart-access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(256 * 1024);
                loop {
                    let finished = done.load(Ordering::Relaxed);
                    let mut disconnected = false;
                    loop {
                        match rx.try_recv() {
                            Ok(line) => {
                                buf.extend_from_slice(&line);
                                if buf.len() >= 256 * 1024 {
                                    write_out(&mut out, &mut buf);
                                }
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                disconnected = true;
                                break;
                            }
                        }
                    }
                    write_out(&mut out, &mut buf);
                    if finished || disconnected {
                        return;
                    }
                    std::thread::sleep(DRAIN_EVERY);
                }
            })?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped,
            closed,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = Vec::with_capacity(320);
        if serde_json::to_writer(&mut line, entry).is_err() {
            return;
        }
        line.push(b'\n');
        if tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The writer drains what is queued, then exits.
        self.closed.store(true, Ordering::Relaxed);
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

/// RFC 3339 UTC timestamp with milliseconds, without pulling in a date crate.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let ms = now.subsec_millis();
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
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
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(now_rfc3339().len(), 24);
    }
}
